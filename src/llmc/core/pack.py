"""Packing integer codes into int32 words, the GPTQ way.

Codes of ``bits`` bits form a continuous little-endian bit stream along the packed dim: code
``i`` occupies stream bits ``[bits*i, bits*(i+1))`` and stream bit ``b`` is bit ``b % 32`` of
word ``b // 32``. For 2, 4 and 8 bits this is ``32 // bits`` codes per word, code ``j`` of a
word at bit offset ``bits*j``; for 3 bits it is AutoGPTQ's layout (32 codes in 3 words, codes
10 and 21 straddling a word boundary); 5, 6 and 7 bits follow the same rule. A length that
does not fill the last word is padded with zero codes.

Shifts run in int64 so that words with the top bit set wrap to negative int32 explicitly.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

_WORD = 32
_MASK32 = (1 << _WORD) - 1


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits: {bits!r} cannot be packed; use an integer from 1 to 8")


def packed_len(length: int, bits: int) -> int:
    """Number of int32 words that hold ``length`` codes of ``bits`` bits."""
    return math.ceil(length * bits / _WORD)


def _positions(length: int, bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Word index ``[length]`` and bit offset ``[length]`` of each code's lowest bit."""
    start = torch.arange(length, dtype=torch.int64, device=device) * bits
    return start // _WORD, start % _WORD


def to_int32(words: Tensor) -> Tensor:
    """int64 values in ``[0, 2^32)`` -> int32 with two's-complement wrap-around."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(q: Tensor, bits: int) -> Tensor:
    """Pack integer codes ``q`` [K, N] in ``[0, 2^bits - 1]`` along dim 0.

    Returns int32 [ceil(K*bits/32), N]: the GPTQ ``qweight`` layout when ``q`` is the
    transposed [in_features, out_features] code matrix.
    """
    _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor [K, N], got shape {tuple(q.shape)}")
    K, N = q.shape
    dense = q.t() if q.t().is_contiguous() else q  # reductions are fast on contiguous memory
    if q.numel() and ((q.dtype != torch.uint8 and int(dense.min()) < 0)
                      or int(dense.max()) > 2**bits - 1):
        raise ValueError(
            f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing; "
            f"got [{int(dense.min())}, {int(dense.max())}]"
        )
    if 8 % bits == 0:
        if q.t().is_contiguous() and not q.is_contiguous():  # [N, K] codes seen as [K, N]
            return _pack_last_aligned(q.t(), bits).t().contiguous()
        return _pack_rows_aligned(q, bits)
    return _pack_rows_general(q, bits)


def _pack_rows_general(q: Tensor, bits: int) -> Tensor:
    """:func:`pack_rows` for any width: a bit stream in int64 words, codes straddling words."""
    K, N = q.shape
    v = q.to(torch.int64)
    word, off = _positions(K, bits, q.device)
    out = torch.zeros(packed_len(K, bits), N, dtype=torch.int64, device=q.device)
    # Codes never share bits, so adding them is the same as OR-ing them in.
    out.index_add_(0, word, (v << off[:, None]) & _MASK32)
    spill = off + bits > _WORD
    if spill.any():
        hi = v[spill] >> (_WORD - off[spill])[:, None]
        out.index_add_(0, word[spill] + 1, hi)
    return to_int32(out)


def _pack_rows_aligned(q: Tensor, bits: int) -> Tensor:
    """:func:`pack_rows` for widths that divide 8, through :func:`_pack_last_aligned`."""
    return _pack_last_aligned(q.t().contiguous(), bits).t().contiguous()


def _pack_last_aligned(q: Tensor, bits: int) -> Tensor:
    """[N, K] codes packed along K -> int32 [N, ceil(K*bits/32)], for widths dividing 8: the
    codes are OR-ed into bytes, and on a little-endian machine four bytes in a row are the
    int32 word (byte b holds bits 8b..8b+7), so no int32 arithmetic touches every code."""
    N, K = q.shape
    if sys.byteorder != "little":
        return _pack_rows_general(q.t(), bits).t().contiguous()
    words = packed_len(K, bits)
    per_byte = 8 // bits
    v = q.to(torch.uint8)
    if words * (_WORD // bits) != K:
        v = torch.cat([v, v.new_zeros(N, words * (_WORD // bits) - K)], dim=1)
    v = v.reshape(N, words * 4, per_byte)
    byte = v[:, :, 0].clone()
    for j in range(1, per_byte):
        byte |= v[:, :, j] << (bits * j)
    return byte.view(torch.int32)


def unpack_rows(packed: Tensor, bits: int, rows: int) -> Tensor:
    """Inverse of :func:`pack_rows`: int32 [ceil(rows*bits/32), N] -> int32 codes [rows, N]."""
    _check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"unpack_rows expects a 2-D tensor, got shape {tuple(packed.shape)}")
    if packed.shape[0] != packed_len(rows, bits):
        raise ValueError(
            f"{packed.shape[0]} packed rows cannot hold {rows} codes of {bits} bits; "
            f"expected {packed_len(rows, bits)}"
        )
    words = packed.to(torch.int64) & _MASK32
    word, off = _positions(rows, bits, packed.device)
    v = words[word] >> off[:, None]
    spill = off + bits > _WORD
    if spill.any():
        v[spill] |= words[word[spill] + 1] << (_WORD - off[spill])[:, None]
    return (v & (2**bits - 1)).to(torch.int32)


def pack_cols(q: Tensor, bits: int) -> Tensor:
    """Pack codes ``q`` [G, N] along dim 1 -> int32 [G, ceil(N*bits/32)] (GPTQ ``qzeros``)."""
    return pack_rows(q.t(), bits).t().contiguous()


def unpack_cols(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`pack_cols`: int32 [G, ceil(cols*bits/32)] -> int32 [G, cols]."""
    return unpack_rows(packed.t(), bits, cols).t().contiguous()
