"""Triton decode kernel on the kernel-native INT4 layout (:mod:`llmc.kernels.native`).

One program computes ``BLOCK_M`` rows of x against ``TILES`` 16-row tiles of W over all of K:
no split-K, so no memset and no atomics. Each 16 x 64 tile's 128 words are read as the
fragment's elements: element ``e`` of row ``R`` is lane ``4 (R % 8) + t``, word ``s``, fragment
slot ``j = 4 jh + 2 (R // 8) + jl`` (``e = ((t * 4 + s) * 2 + jh) * 2 + jl``), column
``16 s + 8 jh + 2 t + jl``; x is read at those columns, so no reordering of the weights is
ever done. A 2:4 weight's tile covers 128 inputs: its 64 columns are the kept slots, each
read at input ``4 (col // 2) + position``. Codes become fp16 by the bit trick
(``code | 0x6400`` is ``1024 + code``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _native_kernel(x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, m_ptr, out_ptr, M, N, K, KT, NP,
                   stride_xm, stride_om, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                   TILES: tl.constexpr, PERM: tl.constexpr,
                   META: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    # row R (16 of a tile, times TILES tiles) x element e (64)
    rt = tl.arange(0, 16 * TILES)
    tile = pid_n * TILES + rt // 16
    R = rt % 16
    e = tl.arange(0, 64)
    t = e // 16
    s = (e // 4) % 4
    jh = (e // 2) % 2
    jl = e % 2
    lane = 4 * (R[:, None] % 8) + t[None, :]
    word_off = lane * 4 + s[None, :]  # [rows, 64] inside a tile's 128 words
    j = 4 * jh[None, :] + 2 * (R[:, None] // 8) + jl[None, :]
    # nibble of fragment slot j: [a0, a2, a4, a6, a1, a3, a5, a7] -> (j % 2) * 4 + j // 2
    shift = 4 * ((j % 2) * 4 + j // 2)
    col1 = 16 * s + 8 * jh + 2 * t + jl  # [64]: the same for every row
    col = col1[None, :]
    srow = tile * 16 + 2 * (R % 8) + R // 8  # position of row R in the scale order
    n_ok = tile * 16 + R < N
    acc = tl.zeros((BLOCK_M, 16 * TILES), dtype=tl.float32)
    for kt in range(0, KT):
        words = tl.load(w_ptr + (tile[:, None] * KT + kt) * 128 + word_off, mask=n_ok[:, None],
                        other=0)
        code = (words >> shift) & 15
        w16 = (code | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
        if META:  # col is a kept slot: its input is 4 (col // 2) + its 2-bit position
            mw = tl.load(m_ptr + (tile[:, None] * KT + kt) * 64 + lane * 2 + s[None, :] // 2,
                         mask=n_ok[:, None], other=0)
            pos = (mw >> (16 * (s[None, :] % 2) + shift // 2)) & 3
            base = kt * 128 + 4 * (col // 2)
            k = base + pos  # [rows, 64]: x differs per row, so a reduction, not an MMA
            k_ok = k < K
            ok = n_ok[:, None] & k_ok
            g = base // GROUP
            sc = tl.load(s_ptr + g * NP + srow[:, None], mask=ok, other=0.0)
            zp = tl.load(z_ptr + g * NP + srow[:, None], mask=ok, other=0)
            w = (w16.to(tl.float32) - zp.to(tl.float32)) * sc.to(tl.float32)
            xv = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + k[None, :, :],
                         mask=m_ok[:, None, None] & k_ok[None, :, :], other=0.0)
            acc += tl.sum(xv.to(tl.float32) * w[None, :, :], axis=2)
        else:  # a column depends on the element alone: x [BLOCK_M, 64] and one MMA
            k1 = kt * 64 + col1
            k1_ok = k1 < K
            if PERM:
                src = tl.load(perm_ptr + k1, mask=k1_ok, other=0)
            else:
                src = k1
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + src[None, :],
                         mask=m_ok[:, None] & k1_ok[None, :], other=0.0)
            if GROUP % 64 == 0:  # one group per tile: scales after the multiply
                g0 = (kt * 64) // GROUP
                sc = tl.load(s_ptr + g0 * NP + srow, mask=n_ok, other=0.0)
                zp = tl.load(z_ptr + g0 * NP + srow, mask=n_ok, other=0)
                wq = (w16 - zp[:, None].to(tl.float16)).to(xv.dtype)  # q - z, exact
                part = tl.dot(xv, tl.trans(wq), input_precision="ieee")
                acc += part * sc[None, :].to(tl.float32)
            else:
                g = k1 // GROUP
                ok = n_ok[:, None] & k1_ok[None, :]
                sc = tl.load(s_ptr + g[None, :] * NP + srow[:, None], mask=ok, other=0.0)
                zp = tl.load(z_ptr + g[None, :] * NP + srow[:, None], mask=ok, other=0)
                w = (w16.to(tl.float32) - zp.to(tl.float32)) * sc.to(tl.float32)
                # groups narrower than a tile: dequantized weights, so an fp32 product
                acc += tl.dot(xv.to(tl.float32), tl.trans(w), input_precision="ieee")
    out_n = tile * 16 + R
    tl.store(out_ptr + offs_m[:, None] * stride_om + out_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def launch(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, perm: Tensor | None,
           N: int, K: int, group_size: int, tiles: int = 2, meta: Tensor | None = None) -> Tensor:
    """``x`` [M, K] (contiguous rows) times the native weight: [M, N] in ``x``'s dtype
    (``meta``: a 2:4 weight's positions)."""
    M = x.shape[0]
    NT, KT = words.shape[:2]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m = 16 if meta is None else max(1, min(16, triton.next_power_of_2(M)))  # tl.dot
    grid = (triton.cdiv(NT, tiles), triton.cdiv(M, block_m))
    _native_kernel[grid](x, words, scales, zeros, perm if perm is not None else words,
                         meta if meta is not None else words, out,
                         M, N, K, KT, scales.shape[1], x.stride(0), out.stride(0),
                         GROUP=group_size, BLOCK_M=block_m, TILES=tiles,
                         PERM=perm is not None, META=meta is not None)
    return out
