"""What the pruners share: their recipe arguments (:class:`PruneArgs`), the mask rule, OWL's
per-block ratios, the union with an earlier step's zeros, and the data-free fallback."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from llmc.core.masks import SCOPES, nm_keep, parse_pattern, unstructured_keep
from llmc.core.scheme import QuantizedWeight, output_error
from llmc.core.stats import HessianStats
from llmc.interfaces import CompressResult, LinearCompressor, Planner, Stats
from llmc.methods.owl import block_sparsity, owl_plan
from llmc.methods.rtn import rtn_compress
from llmc.registry import matches


@dataclass(frozen=True)
class PruneArgs:
    """Recipe arguments shared by the pruners.

    ``sparsity``: fraction of each targeted Linear's weights set to zero (unstructured), or
    ``pattern``: ``"N:M"`` (e.g. ``"2:4"``; N kept of every M consecutive inputs; overrides
    ``sparsity``). ``scope``: unstructured ranking per output ``row`` or over the ``layer``.
    ``layer_sparsity``: ``{name pattern: sparsity}``, the first matching pattern (plain name or
    ``re:``) gives that Linear its own ratio. ``owl``: outlier-weighted layerwise sparsity (Yin
    et al. 2024): blocks with more outlier Wanda scores (above ``owl_m`` times their block's
    mean) get lower sparsity, within ``sparsity +- owl_lambda``, averaging to ``sparsity``."""

    sparsity: float = 0.5
    pattern: str = ""
    scope: str = "row"
    layer_sparsity: dict | None = None
    owl: bool = False
    owl_lambda: float = 0.08
    owl_m: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity: {self.sparsity} must lie in [0, 1)")
        if self.scope not in SCOPES:
            raise ValueError(f"scope: {self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.pattern:
            parse_pattern(self.pattern)
            if self.owl or self.layer_sparsity:
                raise ValueError(
                    "pattern: N:M fixes every layer's sparsity; owl and layer_sparsity apply to "
                    "unstructured sparsity only"
                )
        for key, ratio in (self.layer_sparsity or {}).items():
            if not isinstance(key, str) or isinstance(ratio, bool) \
                    or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
                raise ValueError(
                    f"layer_sparsity: expected {{name pattern: sparsity in [0, 1)}}, got "
                    f"{key!r}: {ratio!r}"
                )
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as e:
                    raise ValueError(f"layer_sparsity: bad regular expression {key!r}: {e}") \
                        from None
        if not 0.0 <= self.owl_lambda < 0.5:
            raise ValueError(f"owl_lambda: {self.owl_lambda} must lie in [0, 0.5)")
        if self.owl_m <= 0:
            raise ValueError(f"owl_m: {self.owl_m} must be positive")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    @property
    def structure(self) -> str:
        return self.pattern or "unstructured"

    def sparsity_for(self, name: str, block_sparsity: float | None = None) -> float:
        """The unstructured ratio of Linear ``name``: a ``layer_sparsity`` match, else its
        block's OWL ratio when planned, else ``sparsity``."""
        for key, ratio in (self.layer_sparsity or {}).items():
            if matches(name, (key,)):
                return float(ratio)
        return self.sparsity if block_sparsity is None else block_sparsity

    def keep_mask(self, scores: Tensor, name: str, block_sparsity: float | None = None) -> Tensor:
        nm = self.nm
        if nm is not None:
            return nm_keep(scores, *nm)
        return unstructured_keep(scores, self.sparsity_for(name, block_sparsity), self.scope)

    def describe(self) -> dict[str, Any]:
        return {"structure": self.structure, "sparsity": 1 - self.nm[0] / self.nm[1]
                if self.nm else self.sparsity}


class _Pruner(LinearCompressor, Planner):
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


def _magnitude_fallback(pruner: _Pruner, name: str, weight: Tensor, mask: Tensor | None,
                        scheme: Any = None) -> CompressResult:
    t = time.perf_counter()
    keep = pruner.keep(name, weight.detach().float().abs(), mask)
    W, qw, how = weight.detach().float() * keep, None, "magnitude"
    if scheme is not None:  # zeros stay zero under RTN (see RTN.compress)
        qw, W = rtn_compress(W, scheme)
        how = "magnitude+rtn"
    res = pruner.result(weight, keep, None, t, W=W, quant=qw)
    res.info["fallback"] = how
    return res
