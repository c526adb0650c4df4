"""Logit distillation of a compressed student from its uncompressed teacher.

The student's block Linears that a step targets train (under
:mod:`llmc.methods.distill.constraints`: zeros stay zero, quantized weights stay on their
grid); everything else is frozen. The loss is the KL divergence between the teacher's and the
student's next-token distributions (temperature, optional top-k), plus ``lm_weight`` times the
LM loss on the training text, plus ``hidden_weight`` times the per-layer hidden-state term
(relative MSE to the teacher's hidden states, averaged over layers).
The held-out windows, never trained on, are scored (mean KL) before the first step and every
``eval_every`` steps; the best state is kept, so the student is never worse on them than when
distillation started, and training stops after ``patience`` evaluations without a gain.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llmc.interfaces import MODEL, TRANSFORM, BlockTransform, WholeModelStep
from llmc.methods.distill.constraints import Best, trained
from llmc.methods.distill.losses import hidden_loss, kl_loss, lm_loss, teacher_targets
from llmc.models import block_linears, get_adapter
from llmc.registry import METHODS


@dataclass(frozen=True)
class DistillConfig:
    """``mode``: 'logit' (the whole model, after the compression steps) or 'block' (each block
    inside the walk, MSE to the uncompressed block's outputs, ``steps`` per block, one walker
    chunk per step). ``steps`` optimizer steps of ``batch_size`` windows; AdamW at ``lr``
    (cosine decay after ``warmup`` steps); KL at ``temperature`` (``topk`` > 0 keeps the
    teacher's k most likely tokens), plus ``lm_weight`` x LM loss, plus ``hidden_weight`` x the
    mean over decoder layers of the relative MSE to the teacher's hidden states (logit mode);
    ``trainable``: 'weights' (straight-through on the grid) or 'scales' (quantized layers keep
    their codes); ``heldout`` windows of the calibration text score every ``eval_every`` steps,
    stop after ``patience`` evaluations without improvement (0: never); ``checkpointing``:
    gradient checkpointing of the blocks; ``autocast``: the training forwards of logit mode
    under bf16 autocast, 'on', 'off' or 'auto' (on where the model sits on a CUDA device that
    supports bf16; held-out scoring always runs in the model's own dtype); ``time_budget``:
    logit mode stops after this many seconds of training (0: no limit)."""

    mode: str = "logit"
    steps: int = 100
    lr: float = 1e-5
    batch_size: int = 4
    temperature: float = 1.0
    topk: int = 0
    lm_weight: float = 0.0
    hidden_weight: float = 0.0
    trainable: str = "weights"
    heldout: int = 8
    eval_every: int = 10
    patience: int = 0
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpointing: bool = False
    autocast: str = "auto"
    time_budget: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "heldout", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("topk", "patience", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if min(self.lm_weight, self.hidden_weight, self.weight_decay, self.grad_clip,
               self.time_budget) < 0:
            raise ValueError("lm_weight, hidden_weight, weight_decay, grad_clip and time_budget "
                             "must be >= 0")
        if self.hidden_weight and self.mode == "block":
            raise ValueError("hidden_weight is a logit-mode term; block mode already matches "
                             "each block's outputs")
        if self.mode not in ("logit", "block"):
            raise ValueError(f"mode must be 'logit' or 'block', got {self.mode!r}")
        if self.autocast not in ("auto", "on", "off"):
            raise ValueError(f"autocast must be 'auto', 'on' or 'off', got {self.autocast!r}")
        if self.trainable not in ("weights", "scales"):
            raise ValueError(f"trainable must be 'weights' or 'scales', got {self.trainable!r}")


def trainable_linears(model: nn.Module, selects) -> dict[str, nn.Linear]:
    """The block Linears (full names) that ``selects(name)`` accepts."""
    adapter = get_adapter(model.config)
    out = {}
    for b, block in enumerate(adapter.get_blocks(model)):
        for n, m in block_linears(block).items():
            name = f"{adapter.blocks}.{b}.{n}"
            if selects(name):
                out[name] = m
    return out


@torch.no_grad()
def heldout_kl(student: nn.Module, teacher_out: list[tuple[Tensor, Tensor | None]],
               windows: Tensor, config: DistillConfig) -> float:
    """Mean per-token KL on the held-out windows (teacher targets precomputed)."""
    total, n = 0.0, 0
    for (logp, idx), start in zip(teacher_out, range(0, windows.shape[0], config.batch_size)):
        ids = windows[start : start + config.batch_size]
        logits = student(input_ids=ids, use_cache=False).logits
        total += kl_loss(logits, logp, idx, config.temperature).item() * ids.shape[0]
        n += ids.shape[0]
    return total / n


def distill_logits(student: nn.Module, teacher: nn.Module, train: Tensor, heldout: Tensor,
                   config: DistillConfig, selects=lambda name: True,
                   progress: bool = True) -> dict[str, Any]:
    """Distill ``student`` (in place) from ``teacher`` on ``train`` windows [S, T], choosing
    the best state on ``heldout`` windows; returns a JSON-able record.

    Zeros stay zero in every Linear a pruning step marked (``llmc_sparsity``), and in every
    targeted Linear of a model loaded from a pruned checkpoint (``config.llmc_sparsity``,
    which does not list the layers)."""
    t0 = time.perf_counter()
    linears = trainable_linears(student, selects)
    if not linears:
        raise ValueError("distill: the step targets no Linear of the blocks")
    if getattr(student.config, "llmc_sparsity", None):
        for m in linears.values():
            if getattr(m, "llmc_sparsity", None) is None:
                m.llmc_mask = m.weight.detach() != 0
    teacher.eval()
    student.eval()  # no dropout: the student's forward must match the evaluation's
    try:
        with trained(student, linears, config.trainable) as (params, kinds):
            if config.checkpointing and hasattr(student, "gradient_checkpointing_enable"):
                student.gradient_checkpointing_enable()
            step, history, best = _train_logits(student, teacher, train, heldout, config,
                                                params, progress, t0)
            best.restore()
    finally:
        for m in linears.values():
            if hasattr(m, "llmc_mask"):
                del m.llmc_mask
        if config.checkpointing and hasattr(student, "gradient_checkpointing_disable"):
            student.gradient_checkpointing_disable()
    return {"mode": "logit", "layers": kinds, "steps_run": step, "best_step": best.step,
            "heldout_kl_start": history[0]["heldout_kl"], "heldout_kl_best": best.score,
            "history": history, "seconds": time.perf_counter() - t0,
            "train_windows": int(train.shape[0]), "heldout_windows": int(heldout.shape[0])}


def _train_logits(student: nn.Module, teacher: nn.Module, train: Tensor, heldout: Tensor,
                  config: DistillConfig, params: list[Tensor], progress: bool,
                  t0: float) -> tuple[int, list[dict[str, Any]], Best]:
    """The optimizer loop of :func:`distill_logits`: (steps run, held-out history, best)."""
    with torch.no_grad():
        held_targets = [
            teacher_targets(teacher(input_ids=heldout[s : s + config.batch_size],
                                    use_cache=False).logits, config.temperature, config.topk)
            for s in range(0, heldout.shape[0], config.batch_size)
        ]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        frac = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    amp = use_autocast(student, config.autocast)
    hidden = bool(config.hidden_weight)
    history = [{"step": 0, "heldout_kl": heldout_kl(student, held_targets, heldout, config)}]
    best = Best(params, history[0]["heldout_kl"])
    since_best = 0
    gen = torch.Generator().manual_seed(config.seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="Distilling", unit="step")
    running = None
    step = 0
    for step in range(1, config.steps + 1):
        idx = torch.randint(0, train.shape[0], (config.batch_size,), generator=gen)
        ids = train[idx]
        with torch.no_grad(), amp():
            t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            t_logp, t_idx = teacher_targets(t_out.logits, config.temperature, config.topk)
        with amp():
            s_out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        logits = s_out.logits
        loss = kl_loss(logits, t_logp, t_idx, config.temperature)
        if config.lm_weight:
            loss = loss + config.lm_weight * lm_loss(logits, ids)
        if hidden:
            loss = loss + config.hidden_weight * hidden_loss(s_out.hidden_states,
                                                             t_out.hidden_states)
        del t_out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        out_of_time = bool(config.time_budget) and time.perf_counter() - t0 > config.time_budget
        if step % config.eval_every == 0 or step == config.steps or out_of_time:
            kl = heldout_kl(student, held_targets, heldout, config)
            history.append({"step": step, "loss": running, "heldout_kl": kl})
            since_best = 0 if best.offer(kl, step) else since_best + 1
            if bar is not None:
                bar.set_postfix(loss=f"{running:.4f}", heldout_kl=f"{kl:.4f}", best=best.step)
            if config.patience and since_best >= config.patience:
                break
        if out_of_time:
            break
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return step, history, best


def use_autocast(model: nn.Module, mode: str):
    """A factory of the bf16 autocast context for ``model``'s training forwards (``mode``:
    'on', 'off', or 'auto': on a CUDA device with bf16 support only)."""
    device = next(model.parameters()).device
    on = mode == "on" or (mode == "auto" and device.type == "cuda"
                          and torch.cuda.is_bf16_supported())
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def snapshot_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` as it is now (the teacher of a later distill step)."""
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class Distill(BlockTransform, WholeModelStep):
    """The ``distill`` recipe step. Logit mode runs after the walk, on the whole model, with the
    model as it was before the recipe's compression steps as the teacher (``llmc.compress``),
    or with a given teacher (``llmc distill``). Block mode is a block transform of the walk,
    after each block's compression steps."""

    needs_calibration = True
    stores_outputs = True  # block mode leaves the block's outputs in the walker's cache

    def __init__(self, config: DistillConfig) -> None:
        self.config = config
        self.post_walk = config.mode == "logit"
        self.needs_teacher = config.mode == "block"
        self.kind = MODEL if self.post_walk else TRANSFORM  # (the kinds: llmc.interfaces)
        self.distributed = not self.post_walk  # block mode's steps are shared across ranks

    def transform(self, ctx: Any, step: Any) -> dict[str, Any]:
        from llmc.methods.distill.block import distill_block

        return distill_block(ctx, step, self.config)

    def run(self, student: nn.Module, teacher: nn.Module, train: Tensor, heldout: Tensor,
            step: Any, progress: bool = True) -> dict[str, Any]:
        return distill_logits(student, teacher, train, heldout, self.config, step.selects,
                              progress)


METHODS.register("distill", DistillConfig, Distill,
                 "distillation from the uncompressed model: logit KL (optional LM loss) after the "
                 "walk, or block-wise MSE inside it; keeps zeros and quantization grids; comes "
                 "after the compression steps", role="distill")
