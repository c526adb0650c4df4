"""Pieces the Triton kernels share (imported only where Triton is): the GPTQ-layout qparams
of a group, codes as floats without an int-to-float conversion, and the split-K epilogue.
Jitted code may read no global but a ``tl.constexpr``, hence the wrapped constants."""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC = tl.constexpr(0x4B000000)  # float 2^23: (q | MAGIC) read as float is 2^23 + q
TWO23 = tl.constexpr(8388608.0)


@triton.jit
def _qparams(s_ptr, z_ptr, g, offs_n, n_ok, z_shift, stride_sg, stride_sn, stride_zg, stride_zn,
             MAXQ: tl.constexpr, PER_WORD: tl.constexpr):
    """Scales (fp32) and zero points of groups ``g`` (any shape broadcastable against
    offs_n); zero points packed PER_WORD per int32 along N, ``z_shift`` their bit offsets."""
    s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0.0)
    zw = tl.load(z_ptr + g * stride_zg + (offs_n // PER_WORD) * stride_zn, mask=n_ok, other=0)
    return s.to(tl.float32), (zw >> z_shift) & MAXQ


@triton.jit
def _code_plus_2p23(word, shift, MAXQ: tl.constexpr):
    """``2^23 + q`` as fp32 for the code ``q`` at bit ``shift`` of ``word``; subtracting
    ``2^23 + z`` gives ``q - z`` exactly."""
    return (((word >> shift) & MAXQ) | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tiled program's rows of x and columns of the output (grid axes 0 and 1), their
    bounds, and its split-K index (axis 2)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N, tl.program_id(2)


@triton.jit
def _write_out(out, vals, mask, SPLIT_K: tl.constexpr):
    """Store ``vals`` at the pointers ``out``; with split-K, add them atomically (the buffer
    was zeroed)."""
    if SPLIT_K == 1:
        tl.store(out, vals.to(out.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, vals.to(out.dtype.element_ty), mask=mask)
