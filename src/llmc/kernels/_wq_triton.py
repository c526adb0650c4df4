"""The Triton kernel of :mod:`llmc.kernels.wq_matmul` (imported only where Triton is)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmc.kernels._swap_triton import _wq_swap_kernel
from llmc.kernels._triton_common import MAGIC, TWO23, _code_plus_2p23, _qparams, _tile, _write_out
from llmc.kernels.tune import Config, atomic_out, finish_out, pick, swap_enabled

# How the group of a weight row is found: the whole K tile lies in one group (scales and zero
# points loaded once per tile and applied after the dot); the rows of one packed word share a
# group (k // group_size); or any g_idx (act order), looked up per row.
TILE = tl.constexpr(0)  # constexpr: jitted code may read no other globals
WORD = tl.constexpr(1)
ROW = tl.constexpr(2)


@triton.jit
def _wq_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_om, stride_on,
    GROUP_SIZE,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUPS: tl.constexpr, SPLIT_DOT: tl.constexpr, MAGIC16: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile over K tiles of BLOCK_W packed words (BLOCK_W *
    32 // BITS rows of W). SPLIT_DOT: each word row is loaded once and the tile is reduced as
    32 // BITS dots, one per code position in the word (x gathered with that stride);
    otherwise the codes are unpacked to a (BLOCK_K, BLOCK_N) tile (each word loaded once per
    code, from L1) for one dot. MAGIC16 (non-zero: the bits of 1024.0 in fp16 or 128.0 in
    bf16, x's dtype): with trivial groups, ``q - z`` is formed in x's dtype as
    ``(q | MAGIC16) - (z | MAGIC16)`` read as 16-bit floats (exact), with no int-to-float
    conversion."""
    PER_WORD: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    BLOCK_K: tl.constexpr = BLOCK_W * PER_WORD
    offs_m, offs_n, m_ok, n_ok, pid_k = _tile(M, N, BLOCK_M, BLOCK_N)
    z_shift = (offs_n % PER_WORD) * BITS
    KW = (K + PER_WORD - 1) // PER_WORD
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        if GROUPS == TILE:
            s, z = _qparams(s_ptr, z_ptr, k0 // GROUP_SIZE, offs_n, n_ok, z_shift, stride_sg,
                            stride_sn, stride_zg, stride_zn, MAXQ, PER_WORD)
            if MAGIC16 != 0:
                zc = (z | MAGIC16).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True)
        if SPLIT_DOT:
            offs_w = k0 // PER_WORD + tl.arange(0, BLOCK_W)  # word rows (BW,)
            w_ok = offs_w < KW
            qw = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                         mask=w_ok[:, None] & n_ok[None, :], other=0)  # (BW, BN) int32
            if GROUPS == WORD:
                s, z = _qparams(s_ptr, z_ptr, (offs_w * PER_WORD // GROUP_SIZE)[:, None],
                                offs_n[None, :], w_ok[:, None] & n_ok[None, :],
                                z_shift[None, :], stride_sg, stride_sn, stride_zg, stride_zn,
                                MAXQ, PER_WORD)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(PER_WORD):
                offs_k = offs_w * PER_WORD + j
                k_ok = offs_k < K
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BW)
                q = (qw >> (j * BITS)) & MAXQ
                if GROUPS == TILE:
                    if MAGIC16 != 0:
                        wq = (q | MAGIC16).to(tl.int16).to(x.dtype, bitcast=True) - zc[None, :]
                        part += tl.dot(x, wq)
                    else:
                        part += tl.dot(x, (q - z[None, :]).to(x.dtype))
                else:
                    if GROUPS == ROW:
                        g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
                        s, z = _qparams(s_ptr, z_ptr, g[:, None], offs_n[None, :],
                                        k_ok[:, None] & n_ok[None, :], z_shift[None, :],
                                        stride_sg, stride_sn, stride_zg, stride_zn, MAXQ,
                                        PER_WORD)
                    part += tl.dot(x, ((q - z).to(tl.float32) * s).to(x.dtype))
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
            qw = tl.load(qw_ptr + (offs_k[:, None] // PER_WORD) * stride_qk
                         + offs_n[None, :] * stride_qn,
                         mask=k_ok[:, None] & n_ok[None, :], other=0)  # (BK, BN)
            q = (qw >> ((offs_k[:, None] % PER_WORD) * BITS)) & MAXQ
            if GROUPS == TILE:
                part = tl.dot(x, (q - z[None, :]).to(x.dtype))
            else:
                g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
                s, z = _qparams(s_ptr, z_ptr, g[:, None], offs_n[None, :],
                                k_ok[:, None] & n_ok[None, :], z_shift[None, :], stride_sg,
                                stride_sn, stride_zg, stride_zn, MAXQ, PER_WORD)
                part = tl.dot(x, ((q - z).to(tl.float32) * s).to(x.dtype))
        if GROUPS == TILE:
            acc += part * s[None, :]  # integer dot, then the tile's one scale
        else:
            acc += part
    _write_out(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc,
               m_ok[:, None] & n_ok[None, :], SPLIT_K)


@triton.jit
def _half2_word(w, x04, x15, x26, x37, zlo, zhi):
    """``sum_j x_j (q_j - z)`` over the eight 4-bit codes of each int32 word ``w``, in packed
    fp16 arithmetic (PTX): codes j and j + 4 are masked out together as the half2
    ``{1024 + q_j, 1024 + q_j+4}`` (odd j as ``1024 + 16 q``, scaled back by an fma),
    ``- {1024 + z}`` makes ``q - z`` exactly, two fp16 fmas per pair of codes accumulate, and
    the two halves are summed in fp32. ``xAB``: the fp16 bits of x_A and x_B as one word;
    ``zlo``, ``zhi``: ``{1024 + z}`` and ``{-(64 + z)}`` twice. CUDA only (the interpreter
    runs no PTX)."""
    return tl.inline_asm_elementwise(
        """
        {
        .reg .b32 lo, hi, t, d, acc, k;
        .reg .f16 a, b;
        .reg .f32 fa, fb;
        mov.b32 k, 0x2C002C00;
        lop3.b32 lo, $1, 0x000f000f, 0x64006400, 0xea;
        lop3.b32 hi, $1, 0x00f000f0, 0x64006400, 0xea;
        shr.b32 t, $1, 8;
        sub.f16x2 d, lo, $6;
        mul.f16x2 acc, d, $2;
        fma.rn.f16x2 d, hi, k, $7;
        fma.rn.f16x2 acc, d, $3, acc;
        lop3.b32 lo, t, 0x000f000f, 0x64006400, 0xea;
        lop3.b32 hi, t, 0x00f000f0, 0x64006400, 0xea;
        sub.f16x2 d, lo, $6;
        fma.rn.f16x2 acc, d, $4, acc;
        fma.rn.f16x2 d, hi, k, $7;
        fma.rn.f16x2 acc, d, $5, acc;
        mov.b32 {a, b}, acc;
        cvt.f32.f16 fa, a;
        cvt.f32.f16 fb, b;
        add.f32 $0, fa, fb;
        }
        """,
        "=r,r,r,r,r,r,r,r", [w, x04, x15, x26, x37, zlo, zhi], dtype=tl.float32, is_pure=True,
        pack=1)


@triton.jit
def _load_x(x_row, offs_k, K, stride_xk, EVEN: tl.constexpr):
    """x at inputs ``offs_k`` of one row (bounds-checked unless EVEN)."""
    if EVEN:
        return tl.load(x_row + offs_k * stride_xk)
    return tl.load(x_row + offs_k * stride_xk, mask=offs_k < K, other=0.0)


@triton.jit
def _x_pair(x_row, offs_w, j: tl.constexpr, K, stride_xk, EVEN: tl.constexpr):
    """x / 8 at inputs 8w + j and 8w + j + 4 of word rows ``offs_w``, as the fp16 bits of the
    two in one uint32 (the first in the low half), for :func:`_half2_word`."""
    a = _load_x(x_row, offs_w * 8 + j, K, stride_xk, EVEN)
    b = _load_x(x_row, offs_w * 8 + j + 4, K, stride_xk, EVEN)
    a = (a.to(tl.float32) * 0.125).to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    b = (b.to(tl.float32) * 0.125).to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return a | (b << 16)


@triton.jit
def _load_words(qw_ptr, w0, KW, offs_n, n_ok, stride_qk, stride_qn, BLOCK_W: tl.constexpr,
                EVEN: tl.constexpr):
    """Word rows w0..w0+BLOCK_W of the packed weights (BLOCK_W, BLOCK_N), streamed once."""
    offs_w = w0 + tl.arange(0, BLOCK_W)
    ptrs = qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn
    if EVEN:
        return tl.load(ptrs, eviction_policy="evict_first")
    return tl.load(ptrs, mask=(offs_w < KW)[:, None] & n_ok[None, :], other=0,
                   eviction_policy="evict_first")


@triton.jit
def _wq_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_om, stride_on,
    GROUP_SIZE,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUPS: tl.constexpr, MASKED: tl.constexpr, EVEN: tl.constexpr, PREFETCH: tl.constexpr,
    HALF2: tl.constexpr,
):
    """Decode-sized M on CUDA cores: one row of x per program (grid axis 2), BLOCK_N output
    columns, K tiles of BLOCK_W packed words loaded once along N (coalesced). Codes become
    floats by the exponent trick (no int-to-float conversion); the products accumulate
    elementwise in fp32 and are reduced over K once at the end.

    MASKED (groups that are whole words): code i of each 16-bit half of a word is masked in
    place, ``(h & (MAXQ << i*BITS)) | 2^23`` read as a float being ``2^23 + q * 2^(i*BITS)``,
    so that a word costs one shift (its upper half) instead of one per code; x is scaled by
    ``2^-(i*BITS)`` to match, and the zero point enters once per word as ``z * sum(x)``.
    EVEN: K and N are multiples of the tile (no bounds checks on the loads). PREFETCH: the
    next K tile's words are loaded before this one is reduced (register double buffering).
    HALF2 (4-bit codes, fp16 x, whole-word groups, CUDA): each word is reduced in packed fp16
    arithmetic by :func:`_half2_word`, x scaled by 1/8 against fp16 overflow."""
    PER_WORD: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = 16 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    z_shift = (offs_n % PER_WORD) * BITS
    KW = (K + PER_WORD - 1) // PER_WORD
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    step = BLOCK_W * SPLIT_K
    if PREFETCH:
        qw_next = _load_words(qw_ptr, pid_k * BLOCK_W, KW, offs_n, n_ok, stride_qk, stride_qn,
                              BLOCK_W, False)
    for w0 in range(pid_k * BLOCK_W, KW, step):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        if PREFETCH:  # the next tile's words are in flight while this one is reduced
            qw = qw_next
            qw_next = _load_words(qw_ptr, w0 + step, KW, offs_n, n_ok, stride_qk, stride_qn,
                                  BLOCK_W, False)
        else:
            qw = _load_words(qw_ptr, w0, KW, offs_n, n_ok, stride_qk, stride_qn, BLOCK_W, EVEN)
        qw = qw.to(tl.uint32, bitcast=True)  # logical shifts
        if GROUPS == TILE:
            s, z = _qparams(s_ptr, z_ptr, w0 * PER_WORD // GROUP_SIZE, offs_n, n_ok, z_shift,
                            stride_sg, stride_sn, stride_zg, stride_zn, MAXQ, PER_WORD)
            s = s[None, :]
            z = z[None, :]
        elif GROUPS == WORD:
            s, z = _qparams(s_ptr, z_ptr, (offs_w * PER_WORD // GROUP_SIZE)[:, None],
                            offs_n[None, :], (offs_w < KW)[:, None] & n_ok[None, :],
                            z_shift[None, :], stride_sg, stride_sn, stride_zg, stride_zn, MAXQ,
                            PER_WORD)
        part = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        if HALF2 and GROUPS != ROW:
            zu = z.to(tl.uint32)
            zlo = (zu | 0x6400) * 0x10001  # {1024 + z} twice
            zhi = (zu * 16 | 0xD400) * 0x10001  # {-(64 + z)} twice
            part = _half2_word(qw, _x_pair(x_row, offs_w, 0, K, stride_xk, EVEN)[:, None],
                               _x_pair(x_row, offs_w, 1, K, stride_xk, EVEN)[:, None],
                               _x_pair(x_row, offs_w, 2, K, stride_xk, EVEN)[:, None],
                               _x_pair(x_row, offs_w, 3, K, stride_xk, EVEN)[:, None], zlo, zhi)
            acc += part * (s * 8.0)
        elif MASKED and GROUPS != ROW:
            xsum = tl.zeros((BLOCK_W,), dtype=tl.float32)
            for h in tl.static_range(2):
                hw = qw >> (16 * h)  # the upper half's sign bits are masked off below
                for i in tl.static_range(HALF):
                    offs_k = offs_w * PER_WORD + h * HALF + i
                    xj = _load_x(x_row, offs_k, K, stride_xk, EVEN).to(tl.float32)
                    xsum += xj
                    f = ((hw & (MAXQ << (i * BITS))) | MAGIC).to(tl.float32, bitcast=True)
                    part += (xj * (1.0 / (1 << (i * BITS))))[:, None] * (f - TWO23)
            acc += (part - xsum[:, None] * z.to(tl.float32)) * s
        else:
            if GROUPS != ROW:
                c = z.to(tl.float32) + TWO23
            for j in tl.static_range(PER_WORD):
                offs_k = offs_w * PER_WORD + j
                k_ok = offs_k < K
                xj = _load_x(x_row, offs_k, K, stride_xk, EVEN).to(tl.float32)
                f = _code_plus_2p23(qw, j * BITS, MAXQ)
                if GROUPS == ROW:
                    g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
                    s, z = _qparams(s_ptr, z_ptr, g[:, None], offs_n[None, :],
                                    k_ok[:, None] & n_ok[None, :], z_shift[None, :], stride_sg,
                                    stride_sn, stride_zg, stride_zn, MAXQ, PER_WORD)
                    part += xj[:, None] * ((f - (z.to(tl.float32) + TWO23)) * s)
                else:
                    part += xj[:, None] * (f - c)
            if GROUPS == ROW:
                acc += part
            else:
                acc += part * s
    _write_out(out_ptr + m * stride_om + offs_n * stride_on, tl.sum(acc, axis=0), n_ok, SPLIT_K)


def _cfg(bm, bn, bw, split, warps, stages, split_dot=True) -> Config:
    return Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw, SPLIT_K=split,
                       SPLIT_DOT=split_dot), warps, stages)


def _gemv(bn, bw, split, warps, stages, masked=True, prefetch=True, half2=False) -> Config:
    return Config(dict(GEMV=True, BLOCK_N=bn, BLOCK_W=bw, SPLIT_K=split, MASKED=masked,
                       PREFETCH=prefetch, HALF2=half2), warps, stages)


def _swap(bn, bw, split, warps, stages, pairs=True, bm=16) -> Config:
    return Config(dict(SWAP=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw, SPLIT_K=split,
                       PAIRS=pairs), warps, stages)


# The short fixed lists the tuner times on CUDA (the first of each is the default elsewhere).
# BLOCK_W words are BLOCK_W * 32 // bits rows of K; a split dot needs BLOCK_W >= 16.
TILES = [
    _cfg(16, 128, 16, 4, 8, 3), _cfg(16, 64, 16, 4, 4, 3), _cfg(16, 128, 16, 2, 4, 3),
    _cfg(16, 64, 8, 4, 4, 4, False), _cfg(16, 128, 16, 8, 8, 3), _cfg(16, 64, 16, 8, 4, 4),
]
GEMV1 = [  # M = 1: CUDA-core GEMVs (masked or shifted codes, with or without prefetch, fp32
    # or packed fp16 arithmetic); the first is the tuner's reference and the default off CUDA.
    # The others came within 8% of the fastest config on some shape in an H200 tuning run
    _gemv(128, 16, 4, 4, 3, masked=False, prefetch=False),
    _gemv(128, 16, 4, 4, 3), _gemv(64, 16, 8, 2, 4), _gemv(128, 16, 8, 4, 3),
    _gemv(64, 16, 8, 2, 4, masked=False, prefetch=False),
    _gemv(128, 16, 4, 4, 3, half2=True), _gemv(64, 16, 8, 2, 4, half2=True),
    _gemv(64, 8, 8, 2, 3, half2=True), _gemv(128, 16, 8, 4, 3, half2=True),
    _gemv(64, 16, 16, 2, 3, half2=True),
]
SWAP = [  # M <= 16, 4-bit, groups of whole K tiles: the swapped-operand kernel (BLOCK_N of at
    # least 32 per warp keeps the weight tile in registers), byte pairs by PTX (fp16) or code
    # by code (bf16 too)
    _swap(128, 16, 4, 4, 3), _swap(128, 16, 2, 4, 3), _swap(128, 16, 8, 4, 3),
    _swap(256, 16, 4, 8, 3), _swap(128, 8, 4, 4, 4), _swap(128, 8, 8, 4, 4),
    _swap(128, 16, 4, 4, 3, pairs=False), _swap(128, 8, 4, 4, 4, pairs=False),
]
DECODE = GEMV1 + TILES + SWAP  # every decode config (the tests run them all)
PREFILL = [
    _cfg(64, 128, 4, 1, 4, 3, False), _cfg(128, 128, 8, 1, 8, 3, False),
    _cfg(64, 64, 8, 1, 4, 4, False), _cfg(64, 128, 16, 1, 4, 3), _cfg(128, 128, 16, 1, 8, 3),
    # the swapped-operand kernel with 32 or 64 rows of x per tile (the MMA's N)
    _swap(128, 16, 1, 4, 3, bm=64), _swap(128, 16, 2, 4, 3, bm=64), _swap(128, 16, 1, 4, 3, bm=32),
    _swap(256, 16, 1, 8, 3, bm=64), _swap(128, 8, 1, 4, 4, bm=64),
    _swap(128, 16, 1, 4, 3, pairs=False, bm=64),
]


def configs(M: int, dtype: torch.dtype | None = None) -> list[Config]:
    """The tuner's list for M rows of x; with ``dtype``, without the configs that are for
    another dtype (PTX forms for fp16 only; the swapped-operand kernel's code-by-code form for
    bf16, since its byte pairs do better in fp16). ``LLMC_SWAP=0`` leaves the
    swapped-operand configs out."""
    if M == 1:
        out = GEMV1 + TILES[:2] + SWAP
    else:
        out = TILES + SWAP if M <= 16 else PREFILL
    if not swap_enabled():
        out = [c for c in out if not c.kwargs.get("SWAP")]
    return out if dtype is None else [c for c in out if _for_dtype(c, dtype)]


def _for_dtype(c: Config, dtype: torch.dtype) -> bool:
    if c.kwargs.get("HALF2") or c.kwargs.get("PAIRS"):
        return dtype == torch.float16
    if c.kwargs.get("SWAP"):
        return dtype == torch.bfloat16
    return True


def _groups(K: int, bits: int, group_size: int | None, block_w: int) -> int:
    per_word = 32 // bits
    if not group_size:
        return ROW.value
    if group_size % (block_w * per_word) == 0:
        return TILE.value
    return (WORD if group_size % per_word == 0 else ROW).value


def _magic16(x: Tensor, bits: int) -> int:
    """The bits of a 16-bit float whose low mantissa bits can hold a ``bits``-bit code:
    1024.0 in fp16 (10 bits), 128.0 in bf16 (7 bits); 0 where there is none."""
    if x.dtype == torch.float16 and bits <= 10:
        return 0x6400
    if x.dtype == torch.bfloat16 and bits <= 7:
        return 0x4300
    return 0


def _check_swap(x: Tensor, bits: int, group_size: int | None, block_w: int,
                pairs: bool) -> None:
    if not (bits == 4 and x.dtype in (torch.float16, torch.bfloat16) and group_size
            and group_size % (block_w * 8) == 0):
        raise ValueError("the swapped-operand kernel takes 4-bit codes, fp16 or bf16 x and "
                         f"groups of whole K tiles ({block_w * 8} rows)")
    if pairs and x.dtype != torch.float16:
        raise ValueError("the swapped-operand kernel's byte pairs take fp16 x")


def launch(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
           bits: int, group_size: int | None, cfg: Config | None = None) -> Tensor:
    """Check-free launch on a 2-D ``x`` [M, K] (the wrapper checked the shapes). ``cfg``:
    one config (tests); else the tuner's pick from :func:`configs` (timed once per shape on
    CUDA, the first of the list elsewhere)."""
    M, K = x.shape
    N = scales.shape[1]

    def run(c: Config) -> Tensor:
        kw = dict(c.kwargs)
        gemv = kw.pop("GEMV", False)
        swap = kw.pop("SWAP", False)
        split = kw.pop("SPLIT_K")
        if swap:
            _check_swap(x, bits, group_size, kw["BLOCK_W"], kw["PAIRS"])
            kw["ASM"] = (1 if x.is_cuda else 2) if kw.pop("PAIRS") else 0
            kw["EVEN"] = K % (kw["BLOCK_W"] * 8) == 0 and N % kw["BLOCK_N"] == 0
            kernel = _wq_swap_kernel
        elif gemv:
            if kw["HALF2"] and not (x.is_cuda and x.dtype == torch.float16 and bits == 4
                                    and group_size and group_size % 8 == 0):
                raise ValueError("the half2 GEMV takes 4-bit codes, fp16 x on CUDA and groups "
                                 "of whole words")
            kw["EVEN"] = K % (kw["BLOCK_W"] * 32 // bits) == 0 and N % kw["BLOCK_N"] == 0
            kernel = _wq_gemv_kernel
        else:
            if kw["SPLIT_DOT"] and kw["BLOCK_W"] < 16:
                raise ValueError("a split dot needs BLOCK_W >= 16")
            kernel = _wq_matmul_kernel
        if gemv:
            grid = (triton.cdiv(N, kw["BLOCK_N"]), split, M)
        else:
            grid = (triton.cdiv(M, kw["BLOCK_M"]), triton.cdiv(N, kw["BLOCK_N"]), split)
            kw["MAGIC16"] = _magic16(x, bits)
        out = atomic_out(M, N, x, split)
        kernel[grid](
            x, qweight, scales, qzeros, g_idx, out, M, N, K,
            x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
            scales.stride(0), scales.stride(1), qzeros.stride(0), qzeros.stride(1),
            out.stride(0), out.stride(1), group_size or 1,
            BITS=bits, SPLIT_K=split, GROUPS=_groups(K, bits, group_size, kw["BLOCK_W"]),
            num_warps=c.num_warps, num_stages=c.num_stages, **kw,
        )
        return finish_out(out, x)

    if cfg is not None:
        return run(cfg)
    key = ("wq", M, K, N, bits, group_size, x.dtype)
    return pick(key, configs(M, x.dtype), run, x.is_cuda)
