"""SmoothQuant (Xiao et al., ICML 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models"): activation outliers, which break 8-bit activation
quantization, are moved into the weights by per-input-channel scales

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

divided out of the operation that produces ``X`` (a norm) and multiplied into the Linears it
feeds, on the same scaling pairs and folding code AWQ uses (:mod:`llmc.models.scaling`). The
model computes the same function; the quantizer step that follows (RTN or GPTQ, with 8-bit
activations) sees inputs whose channels are evened out. ``max|X_j|`` comes from every
calibration window.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from llmc.interfaces import BlockTransform
from llmc.models.scaling import apply_scales
from llmc.registry import METHODS

log = logging.getLogger(__name__)

PAIR_SETS = ("norms", "all")


@dataclass(frozen=True)
class SmoothQuantConfig:
    """Arguments of the ``smoothquant`` recipe step: ``alpha`` the migration strength in
    [0, 1] (0: no change; 0.8, chosen on held-out windows before GPTQ W8A8 on SmolLM2 over
    0.5 and 0.65: ``benchmarks/tune.py smoothquant``);
    ``pairs``: ``norms`` smooths the inputs the norms produce (q/k/v, gate/up: the paper's
    choice), ``all`` also v -> o and up -> down."""

    alpha: float = 0.8
    pairs: str = "norms"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha: {self.alpha} must lie in [0, 1]")
        if self.pairs not in PAIR_SETS:
            raise ValueError(f"pairs: {self.pairs!r} is not one of {', '.join(PAIR_SETS)}")


def smooth_scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``x_max^alpha / w_max^(1 - alpha)`` per input channel, ``w_max`` over every row of
    ``weights``; channels that saw no activation (or have no weight) keep 1."""
    w_max = torch.cat([W.detach().float().abs() for W in weights]).amax(dim=0)
    x = x_max.float().to(w_max.device)
    s = x.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    ok = torch.isfinite(s) & (s > 0) & (x > 0) & (w_max > 0)
    return torch.where(ok, s, torch.ones_like(s)).clamp(min=1e-5, max=1e5)


def _smoothable(block: nn.Module, pair, which: str) -> bool:
    """A norm's pair; with ``all`` also a Linear's whose outputs map one to one onto the
    inputs of the Linears it feeds (not v -> o under grouped-query attention)."""
    prev = block.get_submodule(pair.prev)
    if not isinstance(prev, nn.Linear):
        return True
    return which == "all" and prev.out_features == block.get_submodule(
        pair.linears[0]).in_features


class SmoothQuant(BlockTransform):
    """The ``smoothquant`` recipe step: per block, the input maxima of every scaling pair the
    step targets, then the scales folded in."""

    needs_calibration = True
    distributed = True  # the input maxima are reduced by their maximum over the ranks (exact)

    def __init__(self, config: SmoothQuantConfig) -> None:
        self.config = config

    def check_model(self, config, adapter) -> None:
        adapter.check_scaling(config)

    def transform(self, ctx, step) -> dict:
        c = self.config
        t0 = time.perf_counter()
        pairs = [p for p in ctx.adapter.scale_pairs
                 if any(step.selects(ctx.prefix + n) for n in p.linears)
                 and _smoothable(ctx.block, p, c.pairs)]
        if not pairs:
            return {}
        fwd = ctx.forward_copy()
        x_max: dict[str, torch.Tensor | None] = {p.prev: None for p in pairs}
        rows = dict.fromkeys(x_max, 0)

        def hook(prev: str):
            def pre(module: nn.Module, inputs: tuple) -> None:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
                if not x.shape[0]:
                    return
                m = x.abs().amax(dim=0).float()
                x_max[prev] = m if x_max[prev] is None else torch.maximum(x_max[prev], m)
                rows[prev] += x.shape[0]
            return pre

        handles = [fwd.get_submodule(p.linears[0]).register_forward_pre_hook(hook(p.prev))
                   for p in pairs]
        try:
            ctx.forward(fwd)
        finally:
            for h in handles:
                h.remove()
        if ctx.dist is not None:  # every rank holds chunks: each pair saw rows here
            for prev in x_max:
                x_max[prev] = ctx.dist.all_reduce(x_max[prev], "max")
                rows[prev] = ctx.dist.all_reduce_int(rows[prev])
        records = []
        for p in pairs:
            if x_max[p.prev] is None or rows[p.prev] < ctx.min_tokens:
                log.warning("block %d: %s -> %s saw %d calibration rows: not smoothed",
                            ctx.index, p.prev, ", ".join(p.linears), rows[p.prev])
                records.append({"prev": p.prev, "linears": list(p.linears),
                                "skipped": f"{rows[p.prev]} calibration rows"})
                continue
            masters = [ctx.block.get_submodule(n) for n in p.linears]
            width = masters[0].in_features
            if x_max[p.prev].numel() != width or any(m.in_features != width for m in masters):
                raise ValueError(f"smoothquant: {p.prev} -> {', '.join(p.linears)} do not share "
                                 "one input width")
            s = smooth_scales(x_max[p.prev], [m.weight.data for m in masters], c.alpha)
            with torch.no_grad():
                apply_scales(ctx.block, p, s.to(masters[0].weight.device),
                             ctx.adapter.norm_offset)
            records.append({"prev": p.prev, "linears": list(p.linears),
                            "x_max": float(x_max[p.prev].max()),
                            "scale_min": float(s.min()), "scale_max": float(s.max())})
        return {"pairs": records, "alpha": c.alpha, "seconds": time.perf_counter() - t0}


METHODS.register("smoothquant", SmoothQuantConfig, SmoothQuant,
                 "SmoothQuant activation smoothing (Xiao et al. 2023); a quantizer step with "
                 "8-bit activations follows", role="transform")
