"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for
Large Language Models"): prune by ``|W_ij| * ||X_j||_2``, the weight times the norm of its input
channel over the calibration tokens; no weight update."""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor

from llmc.core.masks import wanda_scores
from llmc.core.stats import ColumnNormStats, require_inputs
from llmc.interfaces import CompressResult, Stats
from llmc.methods.prune import PruneArgs, _magnitude_fallback, _Pruner
from llmc.registry import METHODS


@dataclass(frozen=True)
class WandaConfig(PruneArgs):
    """Arguments of the ``wanda`` step, ranked per output row by default as in the paper.
    ``true_sequential``: each group of Linears sees inputs that went through the pruned
    Linears before it in the block (one forward pass per block)."""

    true_sequential: bool = True


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
        require_inputs(name, stats)
        t = time.perf_counter()
        return self.result(weight, self.keep(name, wanda_scores(weight, stats.norms), mask),
                           stats, t)

    def compress_without_data(self, name: str, weight: Tensor,
                              mask: Tensor | None = None) -> CompressResult:
        """The fallback for a starved MoE expert: magnitude pruning at the same sparsity."""
        return _magnitude_fallback(self, name, weight, mask)


METHODS.register("wanda", WandaConfig, Wanda,
                 "Wanda pruning by |W| x input norm (Sun et al. 2023), unstructured or N:M",
                 role="pruner")
