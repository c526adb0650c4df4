"""Triton decode kernel on the kernel-native INT4 layout (:mod:`llmc.kernels.native`).

One program computes ``BLOCK_M`` rows of x against ``TILES`` 16-row tiles of W over all of K:
no split-K, so no memset and no atomics. Each 16 x 64 tile's 128 words are read as the
fragment's elements: element ``e`` of row ``R`` is lane ``4 (R % 8) + t``, word ``s``, fragment
slot ``j = 4 jh + 2 (R // 8) + jl`` (``e = ((t * 4 + s) * 2 + jh) * 2 + jl``), column
``16 s + 8 jh + 2 t + jl``; x is read at those columns, so no reordering of the weights is
ever done. A 2:4 weight's tile covers 128 inputs: its 64 columns are the kept slots, read in
slot order (element ``c`` is column ``c``); each kept value is put at its input
``4 (c // 2) + position`` inside the tile's 128, and one MMA takes x's 128 inputs. Codes
become fp16 by the bit trick (``code | 0x6400`` is ``1024 + code``).

Prefill (more than 16 rows of x) runs the same kernel with ``BLOCK_M`` up to 64 and 4 tiles
per program.
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
    if META:  # slot order: element c is column c (c = 16 s + 8 jh + 2 t + jl)
        t = (e // 2) % 4
        s = e // 16
        jh = (e // 8) % 2
    else:
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
            # the tile's kept values at their inputs: [rows, 128], then one MMA
            k2 = kt * 128 + tl.arange(0, 128)
            k2_ok = k2 < K
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + k2[None, :],
                         mask=m_ok[:, None] & k2_ok[None, :], other=0.0)
            if GROUP % 128 == 0:  # one group per tile: q - z (exact) and scales after
                g0 = (kt * 128) // GROUP
                sc = tl.load(s_ptr + g0 * NP + srow, mask=n_ok, other=0.0)
                zp = tl.load(z_ptr + g0 * NP + srow, mask=n_ok, other=0)
                wv = (w16 - zp[:, None].to(tl.float16)).to(xv.dtype)
            else:
                kb = kt * 128 + 4 * (col // 2)  # the first input of the slot's four
                ok = n_ok[:, None] & (kb < K)
                sc = tl.load(s_ptr + (kb // GROUP) * NP + srow[:, None], mask=ok, other=0.0)
                zp = tl.load(z_ptr + (kb // GROUP) * NP + srow[:, None], mask=ok, other=0)
                wv = ((w16.to(tl.float32) - zp.to(tl.float32)) * sc.to(tl.float32)).to(xv.dtype)
            # slots 2q and 2q + 1 hold group q's two kept values, at distinct positions
            wa, wb = tl.split(tl.reshape(wv, (16 * TILES, 32, 2)))
            pa, pb = tl.split(tl.reshape(pos, (16 * TILES, 32, 2)))
            zero = tl.zeros_like(wa)
            d0 = tl.where(pa == 0, wa, zero) + tl.where(pb == 0, wb, zero)
            d1 = tl.where(pa == 1, wa, zero) + tl.where(pb == 1, wb, zero)
            d2 = tl.where(pa == 2, wa, zero) + tl.where(pb == 2, wb, zero)
            d3 = tl.where(pa == 3, wa, zero) + tl.where(pb == 3, wb, zero)
            # tl.join stacks on a new last dim: join(join(d0, d2), join(d1, d3))[r, q, a, b]
            # is d(2a + b), so each row reads d0 d1 d2 d3, the group's four inputs, in order
            dense = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (16 * TILES, 128))
            part = tl.dot(xv, tl.trans(dense), input_precision="ieee")
            if GROUP % 128 == 0:
                acc += part * sc[None, :].to(tl.float32)
            else:
                acc += part
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


DECODE_M = 16  # rows of x up to which the decode configuration runs
PREFILL_TILES = 4  # 16-row tiles of W per program in prefill


def config(M: int, tiles: int) -> tuple[int, int]:
    """``(BLOCK_M, TILES)`` for ``M`` rows of x: decode up to 16 rows (16 rows per program,
    ``tiles`` tiles), prefill above (up to 64 rows and 4 tiles per program)."""
    if M <= DECODE_M:
        return DECODE_M, tiles
    return min(64, triton.next_power_of_2(M)), PREFILL_TILES


def launch(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, perm: Tensor | None,
           N: int, K: int, group_size: int, tiles: int = 2, meta: Tensor | None = None) -> Tensor:
    """``x`` [M, K] (contiguous rows) times the native weight: [M, N] in ``x``'s dtype
    (``meta``: a 2:4 weight's positions); ``tiles`` per program in decode."""
    M = x.shape[0]
    NT, KT = words.shape[:2]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m, tiles = config(M, tiles)
    grid = (triton.cdiv(NT, tiles), triton.cdiv(M, block_m))
    _native_kernel[grid](x, words, scales, zeros, perm if perm is not None else words,
                         meta if meta is not None else words, out,
                         M, N, K, KT, scales.shape[1], x.stride(0), out.stride(0),
                         GROUP=group_size, BLOCK_M=block_m, TILES=tiles,
                         PERM=perm is not None, META=meta is not None)
    return out
