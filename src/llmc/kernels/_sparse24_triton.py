"""The Triton kernel of :mod:`llmc.kernels.sparse24` (imported only where Triton is)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _sparse24_matmul_kernel(
    x_ptr, v_ptr, meta_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_vn, stride_vk, stride_mn, stride_mk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        mask = k_ok[:, None] & n_ok[None, :]
        j0 = (offs_k // 4) * 2  # first kept slot of each row's group, (BK,)
        v0 = tl.load(v_ptr + offs_n[None, :] * stride_vn + j0[:, None] * stride_vk,
                     mask=mask, other=0.0)  # (BK, BN)
        v1 = tl.load(v_ptr + offs_n[None, :] * stride_vn + (j0 + 1)[:, None] * stride_vk,
                     mask=mask, other=0.0)
        word = tl.load(meta_ptr + offs_n[None, :] * stride_mn + (j0 // 16)[:, None] * stride_mk,
                       mask=mask, other=0)  # positions of slots j0, j0 + 1 share a word
        p0 = (word >> ((j0 % 16) * 2)[:, None]) & 3
        p1 = (word >> ((j0 % 16) * 2 + 2)[:, None]) & 3
        pos = (offs_k % 4)[:, None]
        w = tl.where(pos == p0, v0, tl.where(pos == p1, v1, 0.0))  # (BK, BN), expanded
        acc += tl.dot(x, w.to(x.dtype))
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.atomic_add(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def config(M: int, K: int, N: int) -> dict[str, int]:
    if M <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64,
                "SPLIT_K": max(1, min(8, K // 512)), "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4,
            "num_stages": 3}


def launch(x: Tensor, values: Tensor, meta: Tensor, cfg: dict[str, int] | None = None) -> Tensor:
    M, K = x.shape
    N = values.shape[0]
    cfg = dict(cfg or config(M, K, N))
    split = cfg.pop("SPLIT_K")
    out = torch.zeros(M, N, device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split)
    _sparse24_matmul_kernel[grid](
        x, values, meta, out, M, N, K,
        x.stride(0), x.stride(1), values.stride(0), values.stride(1),
        meta.stride(0), meta.stride(1), out.stride(0), out.stride(1),
        SPLIT_K=split, **cfg,
    )
    return out.to(x.dtype) if split > 1 else out
