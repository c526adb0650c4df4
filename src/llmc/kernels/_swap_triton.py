"""Swapped-operand kernels: ``out^T = W x^T``, so that the weight tile,
expanded from its compressed form, is the MMA's first operand, which Triton keeps in registers
(on Hopper, ``wgmma`` takes it from there; x, the small operand, goes through shared memory).
The tiled kernels of :mod:`llmc.kernels._wq_triton` and :mod:`llmc.kernels._sparse24_triton`
instead store every expanded weight tile to shared memory and read it back in the MMA's layout
(a barrier per code position). Here the compressed words come in through the software
pipeline's shared-memory buffers like any load, and are expanded in the registers the MMA
reads: the expanded tile never goes to shared memory. Used for decode-sized M (a 16-row tile
of x) and, W4A16, for prefill (32 or 64 rows).

The trick is the order of K inside a tile. A thread's MMA registers hold pairs of adjacent dot
positions ``p, p + 1``; the positions are arranged so that each pair comes from one word that
the same thread reads, and x is gathered in that order:

- W4A16 (``_wq_swap_kernel``): dot position ``p = 32 i + 8 a + 2 t + b`` is code ``2 a + b``
  (byte ``a``) of word ``4 i + t``, input row ``8 (4 i + t) + 2 a + b`` of the tile.
- 2:4 (``_sparse24_swap_kernel``): the same order, with a pair of groups of four (eight
  inputs, two 32-bit words of kept values, one byte of positions) in the place of a word: dot
  position ``p = 32 i + 8 a + 2 t + b`` is entry ``2 (a % 2) + b`` of group
  ``2 (4 i + t) + a // 2``, the same input row.
- 2:4 + INT4 (``_sparse24q_swap_kernel``): a word of eight kept 4-bit codes covers four groups
  of four (sixteen inputs), so it gives eight pairs: ``p = 64 i + 8 a + 2 t + b`` is entry
  ``2 a + b`` of word ``4 i + t``'s sixteen, input row ``16 (4 i + t) + 2 a + b``.

Imported only where Triton is."""

from __future__ import annotations

import triton
import triton.language as tl

from llmc.kernels._triton_common import _qparams, _tile, _write_out


@triton.jit
def _byte_pair_asm(qw, zz, A: tl.constexpr):
    """Codes 2A and 2A + 1 of each word, minus the zero point, as one packed fp16 pair (int32
    bits) in three instructions plus a constant (PTX, CUDA only): ``prmt`` puts byte A of the
    word into both halves, ``lop3`` keeps its low nibble in the low half and its high nibble
    in the high half under the exponent of 1024 (``1024 + q`` and ``1024 + 16 q``), and one
    ``fma`` by ``{1, 1/16}`` plus ``zz = {-(1024 + z), -(64 + z)}`` leaves ``q - z`` exactly
    in each."""
    if A == 0:
        sel: tl.constexpr = "0x4040"
    elif A == 1:
        sel: tl.constexpr = "0x4141"
    elif A == 2:
        sel: tl.constexpr = "0x4242"
    else:
        sel: tl.constexpr = "0x4343"
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t, k; prmt.b32 t, $1, 0, " + sel + "; "
        "lop3.b32 t, t, 0x00F0000F, 0x64006400, 0xea; mov.b32 k, 0x2C003C00; "
        "fma.rn.f16x2 $0, t, k, $2; }",
        "=r,r,r", [qw, zz], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _code_minus_z(qw, shift, zc, MAGIC16: tl.constexpr, dtype: tl.constexpr):
    """``q - z`` in x's 16-bit dtype for the 4-bit code at bit ``shift`` of each word, as
    ``(q | MAGIC16) - zc`` read as 16-bit floats (``zc``: ``z | MAGIC16`` as such a float;
    exact)."""
    return (((qw >> shift) & 15) | MAGIC16).to(tl.int16).to(dtype, bitcast=True) - zc


@triton.jit
def _byte_pair(qw, zc, zz, A: tl.constexpr, MAGIC16: tl.constexpr, ASM: tl.constexpr,
               dtype: tl.constexpr):
    """Codes 2A and 2A + 1 of each word minus the zero point, in x's dtype, stacked on a new
    last axis (.., 2). ASM 1: by :func:`_byte_pair_asm` (fp16, CUDA); ASM 2: the same three
    instructions written as Triton ops (for the interpreter, which runs no PTX); ASM 0: each
    code on its own as ``(q | MAGIC16) - zc`` read as 16-bit floats (``zc``: ``z | MAGIC16``
    as such a float)."""
    if ASM == 1:
        t = _byte_pair_asm(qw, zz, A)
        lo = t.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (t >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    elif ASM == 2:
        b = (qw >> (8 * A)) & 0xFF  # prmt: byte A into bytes 0 and 2, zeros in 1 and 3
        t = ((b | (b << 16)) & 0x00F0000F) | 0x64006400  # lop3 0xea: (t & mask) | magic
        lo = (t.to(tl.int16).to(tl.float16, bitcast=True)
              + zz.to(tl.int16).to(tl.float16, bitcast=True))  # fma by {1, 1/16} plus zz
        hi = ((t >> 16).to(tl.int16).to(tl.float16, bitcast=True) * 0.0625
              + (zz >> 16).to(tl.int16).to(tl.float16, bitcast=True))
    else:
        lo = _code_minus_z(qw, 8 * A, zc, MAGIC16, dtype)
        hi = _code_minus_z(qw, 8 * A + 4, zc, MAGIC16, dtype)
    return tl.join(lo, hi)


@triton.jit
def _dot_order(p0, p1, p2, p3, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """The byte pairs of (BLOCK_N, BLOCK_W) words, ``pA`` (.., 2) holding codes 2A, 2A + 1, as
    one (BLOCK_N, 8 BLOCK_W) tile in dot order (position ``32 i + 8 a + 2 t + b`` is code
    ``2 a + b`` of word ``4 i + t``)."""
    q = tl.join(tl.join(p0, p1), tl.join(p2, p3))  # (n, w, b, a0, a1), a = 2 a1 + a0
    q = tl.reshape(q, (BLOCK_N, BLOCK_W // 4, 4, 2, 2, 2))  # (n, i, t, b, a0, a1)
    q = tl.permute(q, (0, 1, 5, 4, 2, 3))  # (n, i, a1, a0, t, b)
    return tl.reshape(q, (BLOCK_N, BLOCK_W * 8))


@triton.jit
def _dot_rows(BLOCK_K: tl.constexpr, PAIRS: tl.constexpr):
    """The input row (inside the K tile) of each dot position, as :func:`_dot_order` (4
    pairs per word) or :func:`_dot_order8` (8) lay the entries out: position
    ``8 PAIRS i + 8 a + 2 t + b`` is row ``2 PAIRS (4 i + t) + 2 a + b``."""
    p = tl.arange(0, BLOCK_K)
    return ((p // (8 * PAIRS)) * (8 * PAIRS) + ((p // 2) % 4) * (2 * PAIRS)
            + ((p // 8) % PAIRS) * 2 + p % 2)


@triton.jit
def _times_x(w, x_ptr, offs_m, m_ok, offs_k, K, stride_xm, stride_xk, EVEN: tl.constexpr):
    """``w @ x^T`` for a (BN, BK) weight tile in dot order: x gathered at input rows
    ``offs_k`` (BK,) of the rows ``offs_m`` (bounds-checked along K unless EVEN)."""
    x_ok = m_ok[None, :] if EVEN else m_ok[None, :] & (offs_k < K)[:, None]
    xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                 mask=x_ok, other=0.0)  # (BK, BM)
    return tl.dot(w, xt)


@triton.jit
def _wq_swap_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_om, stride_on,
    GROUP_SIZE,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUPS: tl.constexpr, MAGIC16: tl.constexpr, ASM: tl.constexpr,
    EVEN: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_M) tile of ``out^T`` over K tiles of BLOCK_W packed 4-bit words
    (8 BLOCK_W rows of W, inside one group: the launcher checks), split-K over grid axis 2.
    EVEN: K and N are whole tiles (only the rows of x are bounds-checked). ``g_ptr``, BITS
    and GROUPS are the tile kernel's arguments, unused here."""
    BLOCK_K: tl.constexpr = BLOCK_W * 8
    offs_m, offs_n, m_ok, n_ok, pid_k = _tile(M, N, BLOCK_M, BLOCK_N)
    z_shift = (offs_n % 8) * 4
    KW = (K + 7) // 8
    rows = _dot_rows(BLOCK_K, 4)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        s, z = _qparams(s_ptr, z_ptr, k0 // GROUP_SIZE, offs_n, n_ok, z_shift, stride_sg,
                        stride_sn, stride_zg, stride_zn, 15, 8)
        zu = z.to(tl.uint32)
        zz = ((zu | 0xE400) | ((zu * 16 | 0xD400) << 16)).to(tl.int32, bitcast=True)[:, None]
        zc = (z | MAGIC16).to(tl.int16).to(dtype, bitcast=True)[:, None]
        offs_w = k0 // 8 + tl.arange(0, BLOCK_W)
        qw_ptrs = qw_ptr + offs_w[None, :] * stride_qk + offs_n[:, None] * stride_qn
        if EVEN:
            qw = tl.load(qw_ptrs)  # (BN, BW)
        else:
            qw = tl.load(qw_ptrs, mask=(offs_w < KW)[None, :] & n_ok[:, None], other=0)
        w = _dot_order(_byte_pair(qw, zc, zz, 0, MAGIC16, ASM, dtype),
                       _byte_pair(qw, zc, zz, 1, MAGIC16, ASM, dtype),
                       _byte_pair(qw, zc, zz, 2, MAGIC16, ASM, dtype),
                       _byte_pair(qw, zc, zz, 3, MAGIC16, ASM, dtype), BLOCK_N, BLOCK_W)
        acc += _times_x(w, x_ptr, offs_m, m_ok, k0 + rows, K, stride_xm, stride_xk,
                        EVEN) * s[:, None]
    _write_out(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on, acc,
               m_ok[None, :] & n_ok[:, None], SPLIT_K)


@triton.jit
def _expand24(vals, nib, dtype: tl.constexpr):
    """A group of four from its two kept 16-bit values (``vals``, the first in the low half)
    and their 2-bit positions (the low 4 bits of ``nib``): entries (0, 1) and (2, 3), each
    stacked on a new last axis (.., 2). The four entries are built as the 16-bit lanes of one
    64-bit word, value i shifted to lane p_i."""
    nib = nib.to(tl.uint64)
    vals = vals.to(tl.uint32, bitcast=True).to(tl.uint64)
    dense = (vals & 0xFFFF) << ((nib << 4) & 0x30) | (vals >> 16) << ((nib << 2) & 0x30)
    lo = dense.to(tl.uint32)
    hi = (dense >> 32).to(tl.uint32)
    return (tl.join(lo.to(tl.uint16).to(dtype, bitcast=True),
                    (lo >> 16).to(tl.uint16).to(dtype, bitcast=True)),
            tl.join(hi.to(tl.uint16).to(dtype, bitcast=True),
                    (hi >> 16).to(tl.uint16).to(dtype, bitcast=True)))


@triton.jit
def _sparse24_swap_kernel(
    x_ptr, v_ptr, meta_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_vn, stride_vg, stride_mn, stride_mk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_M) tile of ``out^T`` over K tiles of BLOCK_G groups of four, for
    16-bit values [N, K/2] read as int32 [N, K/4] (a group's two kept values in one word, the
    first in the low half) and meta [N, K/32] read as bytes [N, K/8] (a pair of groups'
    positions in one byte; a load per thread, not a word shared by four); split-K over grid
    axis 2. EVEN: K and N are whole tiles (only the rows of x are bounds-checked)."""
    BLOCK_K: tl.constexpr = BLOCK_G * 4
    offs_m, offs_n, m_ok, n_ok, pid_k = _tile(M, N, BLOCK_M, BLOCK_N)
    G4 = K // 4
    rows = _dot_rows(BLOCK_K, 4)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g0 in range(pid_k * BLOCK_G, G4, BLOCK_G * SPLIT_K):
        offs_w = g0 // 2 + tl.arange(0, BLOCK_G // 2)  # pairs of groups: 8 inputs each
        v_ptrs = v_ptr + offs_n[:, None] * stride_vn + (2 * offs_w)[None, :] * stride_vg
        m_ptrs = meta_ptr + offs_n[:, None] * stride_mn + offs_w[None, :] * stride_mk
        if EVEN:
            va = tl.load(v_ptrs)  # (BN, BG / 2): the even groups' kept values
            vb = tl.load(v_ptrs + stride_vg)  # the odd groups'
            word = tl.load(m_ptrs)
        else:
            ok = n_ok[:, None] & (2 * offs_w < G4)[None, :]
            va = tl.load(v_ptrs, mask=ok, other=0)
            vb = tl.load(v_ptrs + stride_vg, mask=ok, other=0)
            word = tl.load(m_ptrs, mask=ok, other=0)
        nib = word.to(tl.int32)  # the two groups' positions, 4 bits each
        a0, a1 = _expand24(va, nib, dtype)
        b0, b1 = _expand24(vb, nib >> 4, dtype)
        w = _dot_order(a0, a1, b0, b1, BLOCK_N, BLOCK_G // 2)
        acc += _times_x(w, x_ptr, offs_m, m_ok, g0 * 4 + rows, K, stride_xm, stride_xk, EVEN)
    _write_out(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on, acc,
               m_ok[None, :] & n_ok[:, None], SPLIT_K)


@triton.jit
def _dot_order8(p0, p1, p2, p3, p4, p5, p6, p7, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Eight pairs per word (``pA`` (.., 2): entries 2A, 2A + 1 of the word's sixteen inputs)
    of (BLOCK_N, BLOCK_W) words as one (BLOCK_N, 16 BLOCK_W) tile in dot order (position
    ``64 i + 8 a + 2 t + b`` is entry ``2 a + b`` of word ``4 i + t``)."""
    q = tl.join(tl.join(tl.join(p0, p1), tl.join(p2, p3)),
                tl.join(tl.join(p4, p5), tl.join(p6, p7)))  # (n, w, b, a0, a1, a2)
    q = tl.reshape(q, (BLOCK_N, BLOCK_W // 4, 4, 2, 2, 2, 2))  # (n, i, t, b, a0, a1, a2)
    q = tl.permute(q, (0, 1, 6, 5, 4, 2, 3))  # (n, i, a2, a1, a0, t, b)
    return tl.reshape(q, (BLOCK_N, BLOCK_W * 16))


@triton.jit
def _kept_pair(qw, zc, nib, G: tl.constexpr, MAGIC16: tl.constexpr, dtype: tl.constexpr):
    """Group G (of four in each word) of the joint form: its two kept 4-bit codes (slots 2G
    and 2G + 1 of the word) minus the zero point as 16-bit floats, placed at their positions
    (``nib``'s bits 4G..4G+3) by :func:`_expand24`: entries (0, 1) and (2, 3)."""
    d0 = _code_minus_z(qw, 8 * G, zc, MAGIC16, dtype)
    d1 = _code_minus_z(qw, 8 * G + 4, zc, MAGIC16, dtype)
    vals = (d0.to(tl.uint16, bitcast=True).to(tl.uint32)
            | (d1.to(tl.uint16, bitcast=True).to(tl.uint32) << 16))
    return _expand24(vals, nib >> (4 * G), dtype)


@triton.jit
def _sparse24q_swap_kernel(
    x_ptr, qv_ptr, meta_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qw, stride_qn, stride_mr, stride_mc, stride_sg, stride_sn,
    stride_zg, stride_zn, stride_om, stride_on,
    GROUP_SIZE,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN: tl.constexpr, MAGIC16: tl.constexpr,
):
    """The joint 2:4 + INT4 form: one (BLOCK_N, BLOCK_M) tile of ``out^T`` over K tiles of
    BLOCK_W words of ``qvalues`` [K/16, N] (eight kept 4-bit codes, four groups of four, 16
    inputs each; the K tile inside one quantization group: the launcher checks), with meta
    [K/32, N] read as int16 [K/32, 2N] (a word's four groups' positions in one half, which
    each thread reads for itself); split-K over grid axis 2."""
    BLOCK_K: tl.constexpr = BLOCK_W * 16
    offs_m, offs_n, m_ok, n_ok, pid_k = _tile(M, N, BLOCK_M, BLOCK_N)
    z_shift = (offs_n % 8) * 4
    KW = K // 16
    rows = _dot_rows(BLOCK_K, 8)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        s, z = _qparams(s_ptr, z_ptr, k0 // GROUP_SIZE, offs_n, n_ok, z_shift, stride_sg,
                        stride_sn, stride_zg, stride_zn, 15, 8)
        zc = (z | MAGIC16).to(tl.int16).to(dtype, bitcast=True)[:, None]
        offs_w = k0 // 16 + tl.arange(0, BLOCK_W)
        q_ptrs = qv_ptr + offs_w[None, :] * stride_qw + offs_n[:, None] * stride_qn
        m_ptrs = (meta_ptr + (offs_w // 2)[None, :] * stride_mr
                  + (2 * offs_n[:, None] + (offs_w % 2)[None, :]) * stride_mc)
        if EVEN:
            qw = tl.load(q_ptrs)  # (BN, BW)
            mh = tl.load(m_ptrs)
        else:
            ok = n_ok[:, None] & (offs_w < KW)[None, :]
            qw = tl.load(q_ptrs, mask=ok, other=0)
            mh = tl.load(m_ptrs, mask=ok, other=0)
        nib = mh.to(tl.int32) & 0xFFFF
        a0, a1 = _kept_pair(qw, zc, nib, 0, MAGIC16, dtype)
        b0, b1 = _kept_pair(qw, zc, nib, 1, MAGIC16, dtype)
        c0, c1 = _kept_pair(qw, zc, nib, 2, MAGIC16, dtype)
        d0, d1 = _kept_pair(qw, zc, nib, 3, MAGIC16, dtype)
        w = _dot_order8(a0, a1, b0, b1, c0, c1, d0, d1, BLOCK_N, BLOCK_W)
        acc += _times_x(w, x_ptr, offs_m, m_ok, k0 + rows, K, stride_xm, stride_xk,
                        EVEN) * s[:, None]
    _write_out(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on, acc,
               m_ok[None, :] & n_ok[:, None], SPLIT_K)
