"""Weight-only quantized matmul (W4A16, also 2- and 8-bit): ``y = x @ dequant(W)^T``.

Weights in the GPTQ layout (:mod:`llmc.core.pack`): ``qweight`` int32 [K * bits / 32, N] with
the codes packed along K, ``scales`` [G, N], ``qzeros`` int32 [G, N * bits / 32] holding the
zero points as they are (not minus one), ``g_idx`` int32 [K] (act order permutes it). The
kernel dequantizes ``(q - z) * s`` in registers and accumulates in fp32; activations are fp16,
bf16 or fp32 [M, K], the output has their dtype.

Decode-sized M (<= 16) runs one of three kernels, whichever the tuner times fastest: a GEMV
on CUDA cores (M = 1), the tiled kernel with one 16-row tile, or the swapped-operand kernel
(``out^T = W x^T``, the weight tile kept in registers as the MMA's first operand; 4-bit codes
in groups of whole K tiles); all split K over the reduction with atomics, so that enough
programs stream the weights. Prefill (M > 16) runs 64- or 128-row tiles, or the
swapped-operand kernel with 32 or 64 rows of x per tile. With trivial groups
(``g_idx = k // group_size`` and the K tile inside one group) the scales and zeros of a tile
are loaded once; act-order ``g_idx`` loads them per row of the tile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmc.core.pack import unpack_cols, unpack_rows
from llmc.kernels import use_triton

KERNEL_BITS = (2, 4, 8)  # codes that do not straddle int32 words


def dequantize_ref(qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
                   bits: int, in_features: int) -> Tensor:
    """The dense weight [N, K] in fp32."""
    N = scales.shape[1]
    q = unpack_rows(qweight, bits, in_features)  # [K, N]
    z = unpack_cols(qzeros, bits, N)  # [G, N]
    g = g_idx.long()
    return ((q - z[g]).float() * scales.float()[g]).t()


def wq_matmul_ref(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
                  bits: int) -> Tensor:
    """``x [..., K] @ dequant(W)^T -> [..., N]`` in plain torch, fp32 accumulation."""
    W = dequantize_ref(qweight, scales, qzeros, g_idx, bits, x.shape[-1])
    return (x.float() @ W.t().to(x.device)).to(x.dtype)


def _check(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
           bits: int) -> None:
    K = x.shape[-1]
    per_word = 32 // bits
    N = scales.shape[1]
    if bits not in KERNEL_BITS:
        raise ValueError(f"the kernel handles {KERNEL_BITS}-bit codes, not {bits}")
    if qweight.dtype != torch.int32 or qweight.shape != (-(-K // per_word), N):
        raise ValueError(f"qweight: expected int32 [{-(-K // per_word)}, {N}] for K={K}, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    if qzeros.shape != (scales.shape[0], -(-N // per_word)):
        raise ValueError(f"qzeros: expected [{scales.shape[0]}, {-(-N // per_word)}], got "
                         f"{tuple(qzeros.shape)}")
    if g_idx.shape != (K,):
        raise ValueError(f"g_idx: expected [{K}], got {tuple(g_idx.shape)}")


def wq_matmul(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
              bits: int = 4, group_size: int | None = None) -> Tensor:
    """``x [..., K] @ dequant(W)^T -> [..., N]``: the Triton kernel on CUDA (or under
    ``TRITON_INTERPRET=1``), :func:`wq_matmul_ref` elsewhere. ``group_size`` (columns per
    group, with ``g_idx = k // group_size``) enables the one-load-per-tile path."""
    if not use_triton(x.device.type):
        return wq_matmul_ref(x, qweight, scales, qzeros, g_idx, bits)
    _check(x, qweight, scales, qzeros, g_idx, bits)
    from llmc.kernels._wq_triton import launch

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    out = launch(x2, qweight, scales, qzeros, g_idx, bits, group_size)
    return out.reshape(*lead, out.shape[-1])
