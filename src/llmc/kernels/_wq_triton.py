"""The Triton kernel of :mod:`llmc.kernels.wq_matmul` (imported only where Triton is)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _wq_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_om, stride_on,
    GROUP_SIZE,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, TRIVIAL_GROUPS: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    m_ok = offs_m < M
    n_ok = offs_n < N
    z_shift = (offs_n % PER_WORD) * BITS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        qw = tl.load(qw_ptr + (offs_k[:, None] // PER_WORD) * stride_qk
                     + offs_n[None, :] * stride_qn,
                     mask=k_ok[:, None] & n_ok[None, :], other=0)  # (BK, BN) int32
        q = (qw >> ((offs_k[:, None] % PER_WORD) * BITS)) & MAXQ
        if TRIVIAL_GROUPS:
            g = k0 // GROUP_SIZE  # the whole K tile lies in one group
            s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0.0)
            zw = tl.load(z_ptr + g * stride_zg + (offs_n // PER_WORD) * stride_zn, mask=n_ok,
                         other=0)
            z = (zw >> z_shift) & MAXQ  # (BN,)
            w = (q - z[None, :]).to(tl.float32) * s[None, :].to(tl.float32)
        else:
            g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)  # (BK,)
            s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            zw = tl.load(z_ptr + g[:, None] * stride_zg + (offs_n[None, :] // PER_WORD)
                         * stride_zn, mask=k_ok[:, None] & n_ok[None, :], other=0)
            z = (zw >> z_shift[None, :]) & MAXQ
            w = (q - z).to(tl.float32) * s.to(tl.float32)  # (BK, BN)
        acc += tl.dot(x, w.to(x.dtype))  # fp32 accumulation
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.atomic_add(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def config(M: int, K: int, N: int) -> dict[str, int]:
    """Decode (M <= 16) or prefill tiles; split-K so that decode launches enough programs."""
    if M <= 16:
        split = max(1, min(8, K // 512))
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": split,
                "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 1,
            "num_warps": 4, "num_stages": 3}


def launch(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
           bits: int, group_size: int | None, cfg: dict[str, int] | None = None) -> Tensor:
    """Check-free launch on a 2-D ``x`` [M, K] (the wrapper checked the shapes)."""
    M, K = x.shape
    N = scales.shape[1]
    cfg = dict(cfg or config(M, K, N))
    trivial = bool(group_size) and group_size % cfg["BLOCK_K"] == 0
    split = cfg.pop("SPLIT_K")
    out_dtype = torch.float32 if split > 1 else x.dtype
    out = torch.zeros(M, N, device=x.device, dtype=out_dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split)
    _wq_matmul_kernel[grid](
        x, qweight, scales, qzeros, g_idx, out, M, N, K,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), qzeros.stride(0), qzeros.stride(1),
        out.stride(0), out.stride(1), group_size or 1,
        BITS=bits, SPLIT_K=split, TRIVIAL_GROUPS=trivial, **cfg,
    )
    return out.to(x.dtype) if split > 1 else out
