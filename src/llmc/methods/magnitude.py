"""Magnitude pruning: prune the smallest ``|W|``, unstructured or N:M (no data)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor

from llmc.interfaces import CompressResult, Stats
from llmc.methods.prune import PruneArgs, _Pruner
from llmc.registry import METHODS


@dataclass(frozen=True)
class MagnitudeConfig(PruneArgs):
    """Arguments of the ``magnitude`` step: prune by |W| (no data unless ``owl`` needs it);
    ranked over the whole layer by default, as the usual baseline."""

    scope: str = "layer"


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


METHODS.register("magnitude", MagnitudeConfig, Magnitude,
                 "magnitude pruning, unstructured or N:M (no data)", role="pruner")
