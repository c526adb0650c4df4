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
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from llmc.interfaces import BlockContext
from llmc.methods.distill.constraints import Best, trained
from llmc.methods.distill.losses import relative_mse
from llmc.models import block_linears


def split_chunks(ctx: BlockContext, heldout: int, what: str) -> tuple[list[int], list[int]]:
    """The chunks that hold out ``heldout`` windows (the last ones, whole chunks) and the full
    chunks before them, the training chunks; numbered among every rank's chunks when the walk
    runs over several processes (this rank's own are ``ctx.first_chunk`` on)."""
    bs, S = ctx.batch_size, ctx.total_windows
    chunks = list(range(ctx.total_chunks))
    n_held = min(len(chunks) - 1, -(-heldout // bs))
    if n_held < 1:
        raise ValueError(f"{what} needs at least two chunks of {bs} calibration windows (one "
                         f"held out); got {S} windows")
    return chunks[-n_held:], [c for c in chunks[:-n_held] if (c + 1) * bs <= S]


class Chunks:
    """The held-out and training chunks of a learning step (:func:`split_chunks`), numbered
    among every rank's chunks. Over several processes each rank holds some of them: a training
    step is computed by the rank that holds its chunk (:meth:`owner`) and shared
    (:func:`share_tensors`); held-out losses are each rank's own, summed in chunk order."""

    def __init__(self, ctx: BlockContext, heldout: int, what: str) -> None:
        self.held, self.train = split_chunks(ctx, heldout, what)
        self.first, self.n_local, self.dist = ctx.first_chunk, ctx.n_chunks, ctx.dist
        self.n_all = ctx.total_chunks

    def local(self, g: int) -> int | None:
        """Chunk ``g``'s index in this rank's cache (None: another rank's)."""
        c = g - self.first
        return c if 0 <= c < self.n_local else None

    def owner(self, g: int) -> int:
        return 0 if self.dist is None else self.dist.chunk_owner(g, self.n_all)

    def mine(self, chunks: list[int]) -> list[int]:
        """This rank's of ``chunks``, as its cache numbers them."""
        return [c for g in chunks if (c := self.local(g)) is not None]

    def heldout_mean(self, loss: Callable[[int], float]) -> float:
        """The mean of ``loss(c)`` over the held-out chunks, summed in chunk order as one
        process sums them."""
        losses = torch.zeros(len(self.held), dtype=torch.float64)
        for j, g in enumerate(self.held):
            if (c := self.local(g)) is not None:
                losses[j] = loss(c)
        if self.dist is not None:
            self.dist.all_reduce(losses)
        return sum(losses.tolist()) / len(self.held)

    def share_value(self, value: float | None, src: int) -> float:
        """Rank ``src``'s ``value`` (a step's loss) on every rank."""
        t = torch.tensor([value if value is not None else 0.0], dtype=torch.float64)
        if self.dist is not None:
            self.dist.broadcast(t, src)
        return float(t)


def share_tensors(dist: Any, like: list[Tensor], values: list[Tensor] | None, src: int,
                  dtype: torch.dtype) -> list[Tensor]:
    """Rank ``src``'s ``values`` (shaped as ``like``, e.g. a step's gradients) on every rank,
    sent as ``dtype`` in one buffer, on ``like``'s devices in its dtypes; ``values`` itself on
    ``src`` and in one process."""
    if dist is None:
        return values
    if dist.rank == src:
        flat = torch.cat([v.flatten().to("cpu", dtype) for v in values])
    else:
        flat = torch.empty(sum(p.numel() for p in like), dtype=dtype)
    dist.broadcast(flat, src)
    if dist.rank == src:
        return values
    out, offset = [], 0
    for p in like:
        out.append(flat[offset : offset + p.numel()].view(p.shape).to(p.device, p.dtype))
        offset += p.numel()
    return out


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
    block, bs, dist = ctx.block, ctx.batch_size, ctx.dist
    chunks = Chunks(ctx, config.heldout, "block-wise distillation")
    held, train = chunks.held, chunks.train  # among every rank's chunks
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
        return chunks.heldout_mean(lambda c: loss_of(c, False).item())

    linears = {n: m for n, m in block_linears(block).items() if step.selects(ctx.prefix + n)}
    with trained(block, linears, config.trainable) as (params, kinds):
        history = [{"step": 0, "heldout": heldout_loss()}]
        best = Best(params, history[0]["heldout"])
        if params and train:
            opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
            gen = torch.Generator().manual_seed(config.seed + ctx.index)
            for i in range(1, config.steps + 1):
                # every rank draws the same chunk; the rank holding it computes the gradient,
                # which every rank's optimiser then takes
                g = train[int(torch.randint(0, len(train), (1,), generator=gen))]
                src, loss = chunks.owner(g), None
                opt.zero_grad(set_to_none=True)
                if (c := chunks.local(g)) is not None:
                    loss = loss_of(c, True)
                    loss.backward()
                    if config.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                if dist is not None:
                    _share_grads(dist, params, src)
                opt.step()
                if i % config.eval_every == 0 or i == config.steps:
                    h = heldout_loss()
                    value = chunks.share_value(loss.item() if loss is not None else None, src)
                    history.append({"step": i, "loss": value, "heldout": h})
                    best.offer(h, i)
            best.restore()
            if dist is not None:  # the ranks took the same steps; rank 0's weights, to be sure
                with torch.no_grad():
                    for p, t in zip(params, share_tensors(
                            dist, params, [p.data for p in params], 0, torch.float32)):
                        p.copy_(t)
    # The block's outputs on its inputs, in the walker's forward dtype, for the next block.
    ctx.forward(ctx.forward_copy(), store=True)
    return {"mode": "block", "layers": kinds, "heldout_start": history[0]["heldout"],
            "heldout_best": best.score, "best_step": best.step, "history": history,
            "train_windows": len(train) * bs,
            "heldout_windows": ctx.total_windows - held[0] * bs,
            "seconds": time.perf_counter() - t0}


def _share_grads(dist: Any, params: list[Tensor], src: int) -> None:
    """Rank ``src``'s gradients in every rank's ``params`` (a parameter it left without one
    has none on any rank, so the optimiser skips it everywhere)."""
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
    dist.broadcast(has, src)
    with_grad = [p for p, h in zip(params, has.tolist()) if h]
    grads = share_tensors(dist, with_grad, [p.grad for p in with_grad] if dist.rank == src
                          else None, src, torch.float32)
    if dist.rank != src:
        for p, gr in zip(with_grad, grads):
            p.grad = gr
