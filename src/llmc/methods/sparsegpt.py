"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"): prune column block by column block with the OBS update of GPTQ, the mask
chosen inside each block of 128 columns on the updated weights by ``w^2 / [H^-1]_jj^2`` (for
N:M, each run of M columns when the loop reaches it); optionally quantizing in the same pass.
The loop is :func:`llmc.methods.gptq.obs_compress`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor

from llmc.core.scheme import QuantScheme
from llmc.core.stats import HessianStats, consumed, require_inputs
from llmc.interfaces import CompressResult, Stats
from llmc.methods.gptq import PruneRule, obs_compress
from llmc.methods.prune import PruneArgs, _magnitude_fallback, _Pruner
from llmc.registry import METHODS


@dataclass(frozen=True)
class SparseGPTConfig(PruneArgs):
    """Arguments of the ``sparsegpt`` step. ``scope``: ``layer`` (each block's entries ranked
    together, as the reference) or ``row``. ``damp``/``block_size``/``true_sequential`` as for
    GPTQ. ``bits`` > 0 quantizes jointly in the same pass (the paper's 50% + 4-bit and
    2:4 + 4-bit) with ``group_size``/``sym``; pruned entries get the zero point's code."""

    scope: str = "layer"
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    bits: int = 0
    group_size: int = 128
    sym: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise ValueError(f"damp: {self.damp} must lie in (0, 1); the usual value is 0.01")
        if self.block_size < 1:
            raise ValueError(f"block_size: {self.block_size} must be a positive integer")
        nm = self.nm
        if nm and nm[1] > self.block_size:
            raise ValueError(f"pattern: M={nm[1]} is wider than block_size {self.block_size}")
        if self.bits:
            QuantScheme(self.bits, self.group_size, self.sym)

    @property
    def scheme(self) -> QuantScheme | None:
        """The joint quantization scheme (None: prune only)."""
        return QuantScheme(self.bits, self.group_size, self.sym) if self.bits else None


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
        require_inputs(name, stats)
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
        consumed(stats)
        keep = ~pruned if mask is None else ~pruned & mask.to(pruned.device)
        return self.result(weight, keep, stats, t, W=W, quant=qw)

    def compress_without_data(self, name: str, weight: Tensor,
                              mask: Tensor | None = None) -> CompressResult:
        """The fallback for a starved MoE expert: magnitude pruning at the same sparsity (N:M
        pattern), then RTN when the step quantizes."""
        return _magnitude_fallback(self, name, weight, mask, self.config.scheme)


METHODS.register("sparsegpt", SparseGPTConfig, SparseGPT,
                 "SparseGPT OBS pruning (Frantar & Alistarh 2023), unstructured or N:M, "
                 "optionally quantizing in the same pass (bits)", role="pruner")
