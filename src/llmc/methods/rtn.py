"""Round-to-nearest (RTN) weight quantization: each group's qparams from its min/max (or a
clipping search), every weight rounded on its own."""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor

from llmc.core.scheme import (
    ClipSearch,
    QuantArgs,
    QuantizedWeight,
    QuantScheme,
    grouped_qparams,
    output_error,
    quantize_dequantize,
    rtn_codes,
)
from llmc.core.stats import HessianStats
from llmc.interfaces import CompressResult, LinearCompressor, Stats
from llmc.registry import METHODS


def rtn_quantize(W: Tensor, scheme: QuantScheme, clip: ClipSearch | None = None) -> QuantizedWeight:
    """Quantize ``W`` ([N, K], any float dtype) group by group in the original column order."""
    return rtn_codes(W, scheme, clip)


def rtn_compress(W: Tensor, scheme: QuantScheme,
                 clip: ClipSearch | None = None) -> tuple[QuantizedWeight, Tensor]:
    """:func:`rtn_quantize` and the dequantized weight, made together."""
    W = W.detach().float()
    scheme = scheme.for_weight(W)
    scales, zeros = grouped_qparams(W, scheme, clip)
    return quantize_dequantize(W, scales, zeros, scheme.default_g_idx(W.shape[1]), scheme)


@dataclass(frozen=True)
class RTNConfig(QuantArgs):
    """Arguments of the ``rtn`` recipe step. ``clip`` searches each group's clipping range
    (off by default: plain min/max RTN is the usual baseline)."""


class RTN(LinearCompressor):
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

    def compress_codes(self, name: str, weight: Tensor,
                       mask: Tensor | None = None) -> CompressResult:
        """The codes alone (``weight`` None in the result), from ``weight`` in any float dtype:
        for a streamed data-free walk, whose writer needs nothing else."""
        t = time.perf_counter()
        qw = rtn_quantize(weight, self.config.scheme, self.config.clip_search)
        return CompressResult(None, qw, None, time.perf_counter() - t)


METHODS.register("rtn", RTNConfig, RTN, "round-to-nearest weight quantization (no data)",
                 role="quantizer")
