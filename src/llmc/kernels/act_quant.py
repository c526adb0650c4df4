"""Per-token activation quantization for W8A8 matmuls: each row of ``x`` [M, K] to FP8 E4M3
or INT8 with its own scale, ``amax / 448`` or ``amax / 127`` (vLLM's dynamic kernels), as
:func:`llmc.core.act.fake_quantize_act` computes it. A Triton kernel (one program per row
block, two passes over K: the row maxima, then the codes) and its torch twin
:func:`quant_per_token_ref`."""

from __future__ import annotations

import torch
from torch import Tensor

from llmc.core.act import INT8_MAX, MIN_SCALE
from llmc.core.scheme import FP8_MAX
from llmc.kernels import use_triton

KINDS = ("float", "int")


def _check(x: Tensor, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    if x.dim() != 2:
        raise ValueError(f"x: expected [M, K], got {tuple(x.shape)}")


def quant_per_token_ref(x: Tensor, kind: str = "float") -> tuple[Tensor, Tensor]:
    """``(codes [M, K] float8_e4m3fn or int8, scales [M, 1] float32)`` with
    ``x ~ codes * scales``."""
    _check(x, kind)
    xf = x.float()
    qmax = FP8_MAX if kind == "float" else INT8_MAX
    scale = (xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=MIN_SCALE)
    y = xf / scale
    if kind == "float":
        return y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    return torch.round(y).clamp_(-128, 127).to(torch.int8), scale


def quant_per_token(x: Tensor, kind: str = "float") -> tuple[Tensor, Tensor]:
    """:func:`quant_per_token_ref` by the Triton kernel on CUDA (or under
    ``TRITON_INTERPRET=1``), by the reference elsewhere."""
    _check(x, kind)
    if not use_triton(x.device.type):
        return quant_per_token_ref(x, kind)
    from llmc.kernels._act_triton import launch

    return launch(x.contiguous(), kind)
