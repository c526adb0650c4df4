"""The Triton kernel of :mod:`llmc.kernels.act_quant` (imported only where Triton is)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmc.core.act import INT8_MAX, MIN_SCALE
from llmc.core.scheme import FP8_MAX


@triton.jit
def _quant_rows(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, QMAX: tl.constexpr,
                FLOOR: tl.constexpr, IS_FLOAT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.maximum(amax / QMAX, FLOOR)
    tl.store(s_ptr + rows, scale, mask=row_ok)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0)
        y = x.to(tl.float32) / scale[:, None]
        if IS_FLOAT:
            y = _round_e4m3(tl.minimum(tl.maximum(y, -QMAX), QMAX))
            y = y.to(q_ptr.dtype.element_ty)  # exact: y is on the E4M3 grid
        else:
            y = tl.minimum(tl.maximum(_rint(y), -128.0), 127.0).to(tl.int8)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], y, mask=ok)


@triton.jit
def _round_e4m3(y):
    """``y`` (float32, within +-448) rounded to the nearest E4M3 value, ties to even: the
    quantum is 2^(e - 3) for the exponent e of ``y`` (at least -6, the subnormals' 2^-9).
    Rounding here rather than in the cast keeps the result the same on every backend (the
    interpreter's float8 cast does not round to nearest)."""
    e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    quantum = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return _rint(y / quantum) * quantum


@triton.jit
def _rint(y):
    """Round half to even in float32 (|y| < 2^22): adding and subtracting 1.5 * 2^23."""
    return (y + 12582912.0) - 12582912.0


def launch(x: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    M, K = x.shape
    dtype = torch.float8_e4m3fn if kind == "float" else torch.int8
    q = torch.empty(M, K, dtype=dtype, device=x.device)
    s = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    BLOCK_M = 4
    BLOCK_K = min(1024, triton.next_power_of_2(K))
    grid = (triton.cdiv(M, BLOCK_M),)
    _quant_rows[grid](x, q, s, M, K, x.stride(0), q.stride(0),
                      QMAX=FP8_MAX if kind == "float" else INT8_MAX, FLOOR=MIN_SCALE,
                      IS_FLOAT=kind == "float", BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return q, s
