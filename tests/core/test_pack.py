"""Bit packing: round trips on odd shapes and AutoGPTQ's exact word layout."""

from __future__ import annotations

import math

import pytest
import torch

from llmc.core.pack import pack_cols, pack_rows, unpack_cols, unpack_rows


def _codes(shape: tuple[int, int], bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)
    q[0] = 0
    q[1] = 2**bits - 1  # the extremes; all-ones words must wrap to negative int32
    return q


def _autogptq_reference(q: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's ``QuantLinear.pack`` loop (qlinear_cuda.py) on Python ints, K % 32 == 0."""
    K, N = q.shape
    words = [[0] * N for _ in range(K * bits // 32)]
    for n in range(N):
        v = [int(x) for x in q[:, n]]
        i = row = 0
        while row < len(words):
            if bits in (2, 4, 8):
                for j in range(32 // bits):
                    words[row][n] |= v[i + j] << (bits * j)
                i += 32 // bits
                row += 1
                continue
            # 3 bits: 10 codes, then code 10 split 2|1 bits, 10 codes, code 21 split 1|2 bits
            for j in range(10):
                words[row][n] |= v[i + j] << (3 * j)
            i += 10
            words[row][n] |= (v[i] << 30) & 0xFFFFFFFF
            words[row + 1][n] |= (v[i] >> 2) & 1
            i += 1
            for j in range(10):
                words[row + 1][n] |= v[i + j] << (3 * j + 1)
            i += 10
            words[row + 1][n] |= (v[i] << 31) & 0xFFFFFFFF
            words[row + 2][n] |= (v[i] >> 1) & 0x3
            i += 1
            for j in range(10):
                words[row + 2][n] |= v[i + j] << (3 * j + 2)
            i += 10
            row += 3
    t = torch.tensor(words, dtype=torch.int64)
    return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_round_trip_odd_shape(bits: int) -> None:
    q = _codes((830, 545), bits)
    rows = pack_rows(q, bits)
    assert rows.dtype == torch.int32
    assert rows.shape == (math.ceil(830 * bits / 32), 545)
    assert torch.equal(unpack_rows(rows, bits, 830), q)
    cols = pack_cols(q, bits)
    assert cols.shape == (830, math.ceil(545 * bits / 32))
    assert torch.equal(unpack_cols(cols, bits, 545), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_autogptq_pack_loop(bits: int) -> None:
    q = _codes((64, 7), bits, seed=1)
    assert torch.equal(pack_rows(q, bits), _autogptq_reference(q, bits))


def test_3bit_known_words() -> None:
    # 0..7 repeating: word 0 holds codes 0-9 and the low 2 bits of code 10 (2 -> bit 31);
    # word 1 the top bit of code 10, codes 11-20 at offset 1, the low bit of code 21 (5);
    # word 2 the top 2 bits of code 21 and codes 22-31 at offset 2.
    q = (torch.arange(32) % 8)[:, None]
    packed = pack_rows(q, 3)
    assert packed.shape == (3, 1)
    words = [int(w) & 0xFFFFFFFF for w in packed[:, 0]]
    assert words == [0x88FAC688, 0xC688FAC6, 0xFAC688FA]


def test_word_values_and_wrap() -> None:
    assert pack_rows(torch.arange(8)[:, None], 4)[0, 0] == 0x76543210
    assert pack_rows(torch.full((8, 1), 15), 4)[0, 0] == -1
    assert pack_rows(torch.tensor([[0], [0], [0], [128]]), 8)[0, 0] == -(2**31)


def test_padding_with_zeros() -> None:
    q = torch.tensor([[1], [2], [3], [4], [5]])
    packed = pack_rows(q, 4)
    assert packed.shape == (1, 1)
    assert packed[0, 0] == 0x54321
    assert torch.equal(unpack_rows(packed, 4, 5), q.to(torch.int32))


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="expected 2"):
        unpack_rows(torch.zeros(3, 1, dtype=torch.int32), 4, 9)
    with pytest.raises(ValueError, match="from 1 to 8"):
        pack_rows(torch.zeros(8, 1, dtype=torch.int32), 9)
