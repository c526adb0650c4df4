"""Round-to-nearest (RTN) weight quantization: each group's qparams from its min/max (or a
clipping search), every weight rounded on its own."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from llmc.quant.scheme import (
    ClipSearch,
    QuantArgs,
    QuantizedWeight,
    QuantScheme,
    grouped_qparams,
    quantize_dequantize,
    quantize_with_groups,
)


def rtn_quantize(W: Tensor, scheme: QuantScheme, clip: ClipSearch | None = None) -> QuantizedWeight:
    """Quantize ``W`` ([N, K]) group by group in the original column order."""
    W = W.detach().float()
    scales, zeros = grouped_qparams(W, scheme, clip)
    return quantize_with_groups(W, scales, zeros, scheme.default_g_idx(W.shape[1]), scheme)


def rtn_compress(W: Tensor, scheme: QuantScheme,
                 clip: ClipSearch | None = None) -> tuple[QuantizedWeight, Tensor]:
    """:func:`rtn_quantize` and the dequantized weight, made together."""
    W = W.detach().float()
    scales, zeros = grouped_qparams(W, scheme, clip)
    return quantize_dequantize(W, scales, zeros, scheme.default_g_idx(W.shape[1]), scheme)


@dataclass(frozen=True)
class RTNConfig(QuantArgs):
    """Arguments of the ``rtn`` recipe step. ``clip`` searches each group's clipping range
    (off by default: plain min/max RTN is the usual baseline)."""
