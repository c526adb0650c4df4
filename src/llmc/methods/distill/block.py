"""Block-wise distillation inside the layer walker: after a block's compression steps, the
compressed block learns to map its inputs to the uncompressed model's outputs of that block
(relative MSE), on the cached calibration inputs, one block at a time: memory holds one block
and its cached activations, the cheap mode for small machines.

Inputs: the compressed model's hidden states (what this block will see); targets: the
uncompressed block applied to the uncompressed model's own hidden states, so that a block also
learns to undo what the blocks before it got wrong. The last ``heldout`` windows (whole
walker chunks) are never trained on; they choose the best step per block, so no block ends
worse on them than it started.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from llmc.interfaces import BlockContext
from llmc.methods.distill.constraints import Best, trained
from llmc.methods.distill.losses import relative_mse
from llmc.models import block_linears


def split_chunks(ctx: BlockContext, heldout: int, what: str) -> tuple[list[int], list[int]]:
    """The chunks that hold out ``heldout`` windows (the last ones, whole chunks) and the full
    chunks before them, the training chunks."""
    bs, S = ctx.batch_size, ctx.n_windows
    chunks = list(range(ctx.n_chunks))
    n_held = min(len(chunks) - 1, -(-heldout // bs))
    if n_held < 1:
        raise ValueError(f"{what} needs at least two chunks of {bs} calibration windows (one "
                         f"held out); got {S} windows")
    return chunks[-n_held:], [c for c in chunks[:-n_held] if (c + 1) * bs <= S]


def teacher_outputs(ctx: BlockContext, args32: Any) -> nn.Module:
    """The teacher block's outputs on its own inputs (the uncompressed model's hidden states)
    written to ``ctx.teacher_cache``: the targets of a learning step, and the next block's
    teacher inputs. Returns the teacher in float32."""
    with torch.no_grad():
        teacher = ctx.teacher.float()
        for c in range(ctx.n_chunks):
            x = ctx.teacher_cache.read(c).to(ctx.device, torch.float32)
            ctx.teacher_cache.write(c, ctx.run(teacher, c, x, args32))
    return teacher


def distill_block(ctx: BlockContext, step: Any, config: Any) -> dict[str, Any]:
    """Train ``ctx.block`` (float32, compressed) on the block's inputs towards the teacher's
    outputs; writes the block's outputs on those inputs to the cache, and the teacher's outputs
    to ``ctx.teacher_cache``."""
    t0 = time.perf_counter()
    block, bs = ctx.block, ctx.batch_size
    S = ctx.n_windows
    held, train = split_chunks(ctx, config.heldout, "block-wise distillation")
    args32 = ctx.args_as(torch.float32)
    teacher_cache = ctx.teacher_cache
    teacher_outputs(ctx, args32)

    def loss_of(c: int, grad: bool) -> Tensor:
        x = ctx.inputs(c, torch.float32)
        with torch.set_grad_enabled(grad):
            out = ctx.run(block, c, x, args32)
            target = teacher_cache.read_output(c).to(ctx.device, torch.float32)
            return relative_mse(out, target)

    def heldout_loss() -> float:
        return sum(loss_of(c, False).item() for c in held) / len(held)

    linears = {n: m for n, m in block_linears(block).items() if step.selects(ctx.prefix + n)}
    with trained(block, linears, config.trainable) as (params, kinds):
        history = [{"step": 0, "heldout": heldout_loss()}]
        best = Best(params, history[0]["heldout"])
        if params and train:
            opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
            gen = torch.Generator().manual_seed(config.seed + ctx.index)
            for i in range(1, config.steps + 1):
                c = train[int(torch.randint(0, len(train), (1,), generator=gen))]
                loss = loss_of(c, True)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                if i % config.eval_every == 0 or i == config.steps:
                    h = heldout_loss()
                    history.append({"step": i, "loss": loss.item(), "heldout": h})
                    best.offer(h, i)
            best.restore()
    # The block's outputs on its inputs, in the walker's forward dtype, for the next block.
    ctx.forward(ctx.forward_copy(), store=True)
    return {"mode": "block", "layers": kinds, "heldout_start": history[0]["heldout"],
            "heldout_best": best.score, "best_step": best.step, "history": history,
            "train_windows": len(train) * bs, "heldout_windows": S - held[0] * bs,
            "seconds": time.perf_counter() - t0}
