"""The Linear compressors and the registry of methods (the plug-in kinds are in
:mod:`llmc.interfaces`).

A method is a frozen config dataclass plus a thin class that creates statistics objects
(``new_stats``) and compresses one weight (``compress``). Linears that read the same input
(q/k/v; gate/up) share one statistics object; methods whose ``stats_kind`` is equal share it
across recipe steps too. A pruner returns its keep ``mask``; the steps after it in the same
walk get that mask and keep its zeros exactly zero.
"""

from __future__ import annotations

import time
from typing import Any

from torch import Tensor

from llmc.distill.train import Distill, DistillConfig
from llmc.interfaces import CompressResult, Stats
from llmc.prune.masks import PruneArgs
from llmc.prune.owl import block_sparsity, owl_plan
from llmc.prune.sparsegpt import SparseGPTConfig
from llmc.prune.wanda import ColumnNormStats, MagnitudeConfig, WandaConfig, wanda_scores
from llmc.quant.awq import AWQ, AWQConfig
from llmc.quant.gptq import GPTQConfig, HessianStats, PruneRule, gptq_quantize, obs_compress
from llmc.quant.rtn import RTNConfig, rtn_compress
from llmc.quant.scheme import QuantizedWeight, output_error
from llmc.registry import Registry


class RTN:
    """Round-to-nearest quantization; needs no calibration data."""

    needs_calibration = False
    sequential = False
    stats_kind = None

    def __init__(self, config: RTNConfig) -> None:
        self.config = config

    def new_stats(self, in_features: int) -> None:
        return None

    def compress(self, name: str, weight: Tensor, stats: Stats | None,
                 mask: Tensor | None = None) -> CompressResult:
        # Pruned zeros stay zero: every group's range contains 0 and its zero point is an
        # integer, so 0 rounds to the zero point's code.
        t = time.perf_counter()
        qw, W = rtn_compress(weight, self.config.scheme, self.config.clip_search)
        err = output_error(weight, W, stats.H) if isinstance(stats, HessianStats) else None
        return CompressResult(W, qw, err, time.perf_counter() - t)


def _check_fed(name: str, stats: Stats | None) -> None:
    if stats is None or getattr(stats, "nsamples", 0) == 0:
        raise ValueError(f"{name}: no calibration inputs reached this layer")


class GPTQ:
    """GPTQ on the Hessian of each Linear's calibration inputs."""

    needs_calibration = True
    stats_kind = "hessian"

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config
        self.sequential = config.true_sequential

    def new_stats(self, in_features: int) -> HessianStats:
        return HessianStats(in_features)

    def compress(self, name: str, weight: Tensor, stats: Stats | None,
                 mask: Tensor | None = None) -> CompressResult:
        _check_fed(name, stats)
        c = self.config
        t = time.perf_counter()
        qw = gptq_quantize(
            weight, stats.H, c.scheme, act_order=c.act_order, damp=c.damp,
            block_size=c.block_size, clip=c.clip_search, keep=mask, name=name,
            factors=getattr(stats, "factors", None),
        )
        _consumed(stats)
        W = qw.dequantize()
        err = output_error(weight, W, stats.H)
        return CompressResult(W, qw, err, time.perf_counter() - t)

    def compress_without_data(self, name: str, weight: Tensor,
                              mask: Tensor | None = None) -> CompressResult:
        """The fallback for a Linear whose statistics are too thin (a starved MoE expert):
        RTN on the same scheme."""
        t = time.perf_counter()
        qw, W = rtn_compress(weight, self.config.scheme, self.config.clip_search)
        return CompressResult(W, qw, None, time.perf_counter() - t, info={"fallback": "rtn"})


def _consumed(stats: Stats | None) -> None:
    if isinstance(stats, HessianStats):
        stats.consumed()


class _Pruner:
    """What the pruners share: the config's mask rule, OWL's per-block ratios (planned from a
    pass through the uncompressed model before the walk), and the union with an earlier
    step's zeros."""

    def __init__(self, config: PruneArgs) -> None:
        self.config = config
        self.block_sparsity: dict[str, float] = {}

    def plan(self, passes: Any, step: Any) -> dict[str, Any]:
        if not self.config.owl:
            return {}
        self.block_sparsity, record = owl_plan(passes, step, self.config)
        return record

    def restore_plan(self, passes: Any, record: dict[str, Any]) -> None:
        self.block_sparsity = block_sparsity(passes, record)

    def sparsity_of_block(self, name: str) -> float | None:
        for prefix, ratio in self.block_sparsity.items():
            if name.startswith(prefix):
                return ratio
        return None

    def keep(self, name: str, scores: Tensor, mask: Tensor | None) -> Tensor:
        keep = self.config.keep_mask(scores, name, self.sparsity_of_block(name))
        return keep if mask is None else keep & mask.to(keep.device)

    def result(self, weight: Tensor, keep: Tensor, stats: Stats | None, t: float,
               W: Tensor | None = None, quant: QuantizedWeight | None = None) -> CompressResult:
        W = weight.detach().float() * keep if W is None else W
        err = output_error(weight, W, stats.H) if isinstance(stats, HessianStats) else None
        return CompressResult(W, quant, err, time.perf_counter() - t, mask=keep)


class Magnitude(_Pruner):
    """Prune the smallest |W|; needs no calibration data (unless OWL plans the ratios)."""

    sequential = False
    stats_kind = None

    def __init__(self, config: MagnitudeConfig) -> None:
        super().__init__(config)
        self.needs_calibration = config.owl

    def new_stats(self, in_features: int) -> None:
        return None

    def compress(self, name: str, weight: Tensor, stats: Stats | None,
                 mask: Tensor | None = None) -> CompressResult:
        t = time.perf_counter()
        return self.result(weight, self.keep(name, weight.detach().float().abs(), mask),
                           stats, t)


class Wanda(_Pruner):
    """Prune the smallest ``|W_ij| * ||X_j||`` from the calibration inputs."""

    needs_calibration = True
    stats_kind = "sqnorm"

    def __init__(self, config: WandaConfig) -> None:
        super().__init__(config)
        self.sequential = config.true_sequential

    def new_stats(self, in_features: int) -> ColumnNormStats:
        return ColumnNormStats(in_features)

    def compress(self, name: str, weight: Tensor, stats: Stats | None,
                 mask: Tensor | None = None) -> CompressResult:
        _check_fed(name, stats)
        t = time.perf_counter()
        return self.result(weight, self.keep(name, wanda_scores(weight, stats.norms), mask),
                           stats, t)

    def compress_without_data(self, name: str, weight: Tensor,
                              mask: Tensor | None = None) -> CompressResult:
        """The fallback for a starved MoE expert: magnitude pruning at the same sparsity."""
        return _magnitude_fallback(self, name, weight, mask)


def _magnitude_fallback(pruner: _Pruner, name: str, weight: Tensor, mask: Tensor | None,
                        scheme: Any = None) -> CompressResult:
    t = time.perf_counter()
    keep = pruner.keep(name, weight.detach().float().abs(), mask)
    W, qw, how = weight.detach().float() * keep, None, "magnitude"
    if scheme is not None:  # zeros stay zero under RTN (see RTN.compress)
        qw, W = rtn_compress(W, scheme, False)
        how = "magnitude+rtn"
    res = pruner.result(weight, keep, None, t, W=W, quant=qw)
    res.info["fallback"] = how
    return res


class SparseGPT(_Pruner):
    """SparseGPT's OBS pruning on the Hessian of each Linear's inputs; with ``bits`` it
    quantizes in the same pass."""

    needs_calibration = True
    stats_kind = "hessian"

    def __init__(self, config: SparseGPTConfig) -> None:
        super().__init__(config)
        self.sequential = config.true_sequential

    def new_stats(self, in_features: int) -> HessianStats:
        return HessianStats(in_features)

    def compress(self, name: str, weight: Tensor, stats: Stats | None,
                 mask: Tensor | None = None) -> CompressResult:
        _check_fed(name, stats)
        c = self.config
        t = time.perf_counter()
        nm = c.nm
        rule = PruneRule(
            sparsity=0.0 if nm else c.sparsity_for(name, self.sparsity_of_block(name)),
            n=nm[0] if nm else 0, m=nm[1] if nm else 0, scope=c.scope,
        )
        W, qw, pruned = obs_compress(
            weight, stats.H, c.scheme, prune=rule, keep=mask, act_order="none", damp=c.damp,
            block_size=c.block_size, name=name, factors=getattr(stats, "factors", None),
        )
        _consumed(stats)
        keep = ~pruned if mask is None else ~pruned & mask.to(pruned.device)
        return self.result(weight, keep, stats, t, W=W, quant=qw)

    def compress_without_data(self, name: str, weight: Tensor,
                              mask: Tensor | None = None) -> CompressResult:
        """The fallback for a starved MoE expert: magnitude pruning at the same sparsity (N:M
        pattern), then RTN when the step quantizes."""
        return _magnitude_fallback(self, name, weight, mask, self.config.scheme)


METHODS: Registry[type] = Registry("method")
METHODS.register("rtn", RTNConfig, RTN, "round-to-nearest weight quantization (no data)")
METHODS.register("gptq", GPTQConfig, GPTQ, "GPTQ weight quantization (Frantar et al. 2022)")
METHODS.register("awq", AWQConfig, AWQ,
                 "AWQ activation-aware scales, then clipping (Lin et al. 2024); a quantizer step "
                 "follows (rtn when the recipe has none)")
METHODS.register("magnitude", MagnitudeConfig, Magnitude,
                 "magnitude pruning, unstructured or N:M (no data)")
METHODS.register("wanda", WandaConfig, Wanda,
                 "Wanda pruning by |W| x input norm (Sun et al. 2023), unstructured or N:M")
METHODS.register("sparsegpt", SparseGPTConfig, SparseGPT,
                 "SparseGPT OBS pruning (Frantar & Alistarh 2023), unstructured or N:M, "
                 "optionally quantizing in the same pass (bits)")
METHODS.register("distill", DistillConfig, Distill,
                 "distillation from the uncompressed model: logit KL (optional LM loss) after the "
                 "walk, or block-wise MSE inside it; keeps zeros and quantization grids; comes "
                 "after the compression steps")

QUANTIZERS = ("rtn", "gptq")
PRUNERS = ("magnitude", "wanda", "sparsegpt")
