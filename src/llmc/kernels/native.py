"""The kernel-native INT4 layout: weights in the order the tensor cores consume them.

The checkpoint layouts (GPTQ ``[K/8, N]``, AWQ, compressed-tensors) put the codes one thread
needs for its MMA operand far apart; this layout is built from them once, at load, and never
written to a checkpoint. The weight ``W`` [N, K] is the first operand (A, 16 x 16 fp16 tiles)
of ``mma.m16n8k16``, computing ``out^T = W x^T``:

- ``words`` int32 ``[N/16, K/64, 32, 4]``: tile ``(n, k)`` holds rows ``16n .. 16n+15`` and
  columns ``64k .. 64k+63``; lane ``l`` of the warp owns its four words, one per 16-column
  step ``s``, so one 16-byte load per lane is its operand for four MMAs.
- Word ``s`` of lane ``l`` holds the lane's eight A-fragment elements ``a0..a7`` of step ``s``:
  ``a_j`` is row ``l // 4 + 8 * ((j // 2) % 2)``, column ``16 s + 2 (l % 4) + j % 2 + 8 (j // 4)``
  of the tile (PTX ISA, "Matrix Fragments for mma.m16n8k16").
- Inside a word the codes sit at nibbles ``[a0, a2, a4, a6, a1, a3, a5, a7]``, so that
  ``(word >> 4 i) & 0x000F000F`` is the pair ``(a_2i, a_2i+1)`` in the low bits of two 16-bit
  halves: ``| 0x64006400`` turns it into two fp16 values ``1024 + code`` (the bit trick), one
  ``half2`` register of the fragment, with no per-code shifts.
- ``scales`` fp16 and ``zeros`` uint8, both ``[G, N]`` with the rows of each 16-row tile in the
  order ``0, 8, 1, 9, ..., 7, 15``: a lane's two rows (``l // 4`` and ``l // 4 + 8``) are
  adjacent, one 4-byte load per group.
- ``perm`` int32 [K] or None: act order. The columns are sorted by group once (``g_idx``
  stable-sorted), so every group is a contiguous run of ``group_size`` columns; the kernel
  reads ``x[:, perm]``.

Row and column counts that are not multiples of 16 and 64 are padded with zero codes (their
products with the zero-padded ``x`` vanish). :func:`unpack_native` gives back the codes,
scales, zeros and ``g_idx`` bit for bit; :func:`dequantize_native` the dense weight.

Several Linears with the same K and qparam grid (q/k/v, gate/up) are fused by concatenating
their rows before repacking (:func:`repack_fused`); :attr:`NativeInt4.splits` records where
each output begins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llmc.core.pack import to_int32
from llmc.kernels import use_triton

TILE_N, TILE_K, LANES, WORDS = 16, 64, 32, 4
_NIBBLE_OF = (0, 4, 1, 5, 2, 6, 3, 7)  # fragment element j -> nibble position in its word


def _fragment_index() -> tuple[Tensor, Tensor]:
    """Row and column inside a 16 x 64 tile of every (lane, word, element): [32, 4, 8] each."""
    lane = torch.arange(LANES)[:, None, None]
    step = torch.arange(WORDS)[None, :, None]
    j = torch.arange(8)[None, None, :]
    row = lane // 4 + 8 * ((j // 2) % 2)
    col = 16 * step + 2 * (lane % 4) + j % 2 + 8 * (j // 4)
    shape = (LANES, WORDS, 8)
    return row.expand(shape).contiguous(), col.expand(shape).contiguous()


_ROW, _COL = _fragment_index()
# rows of a 16-row tile in the scale order: a lane's rows r and r + 8 side by side
_SCALE_ROWS = torch.tensor([r + 8 * h for r in range(8) for h in range(2)])


@dataclass
class NativeInt4:
    """An INT4 weight in the kernel-native layout (see the module's docstring)."""

    words: Tensor  # int32 [N_pad/16, K_pad/64, 32, 4]
    scales: Tensor  # fp16 [G, N_pad], rows in _SCALE_ROWS order per tile
    zeros: Tensor  # uint8 [G, N_pad], same order
    perm: Tensor | None  # int32 [K]: column order (act order); None: the identity
    out_features: int
    in_features: int
    group_size: int
    splits: list[int] = field(default_factory=list)  # first row of each fused Linear
    # 2:4: int32 [N_pad/16, K_pad/128, 32, 2], each kept slot's position (0..3) in its group
    # of 4 inputs, in the words' fragment order; ``words`` then hold the kept slots' codes
    meta: Tensor | None = None

    @property
    def bits(self) -> int:
        return 4

    def to(self, device: torch.device | str) -> NativeInt4:
        """The same weight with its tensors on ``device``."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(self, words=self.words.to(device),
                                   scales=self.scales.to(device), zeros=self.zeros.to(device),
                                   perm=move(self.perm), meta=move(self.meta))


def _pad_to(x: Tensor, dim: int, multiple: int) -> Tensor:
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _sorted_columns(g_idx: Tensor, group_size: int, K: int) -> Tensor | None:
    """The stable sort of ``g_idx`` (None where it is already ``k // group_size``); refused
    where the sorted groups are not runs of ``group_size`` columns."""
    g = g_idx.long()
    trivial = torch.arange(K, device=g.device) // group_size
    if torch.equal(g, trivial):
        return None
    perm = torch.sort(g, stable=True).indices
    if not torch.equal(g[perm], trivial):
        raise ValueError(
            f"g_idx puts columns in groups that are not {group_size} wide once sorted; the "
            "native layout needs act order as GPTQ makes it (each group holds group_size "
            "columns); use the GPTQ-layout kernel for this weight")
    return perm.to(torch.int32)


def repack_native(q: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor,
                  group_size: int) -> NativeInt4:
    """Codes ``q`` [N, K] in [0, 15], ``scales`` and ``zeros`` [N, G] and ``g_idx`` [K] (the
    :class:`~llmc.core.scheme.QuantizedWeight` fields) in the kernel-native layout."""
    return repack_fused([(q, scales, zeros, g_idx)], group_size)


def repack_fused(parts: list[tuple[Tensor, Tensor, Tensor, Tensor]],
                 group_size: int) -> NativeInt4:
    """Several Linears' ``(q, scales, zeros, g_idx)`` with the same K, ``g_idx`` and groups,
    their rows concatenated (q/k/v, gate/up), in one native weight."""
    if not parts:
        raise ValueError("repack_fused needs at least one weight")
    K = parts[0][0].shape[1]
    for q, s, z, g in parts:
        if q.dim() != 2 or q.shape[1] != K or g.shape != (K,):
            raise ValueError(f"weights to fuse need the same in_features and g_idx; got codes "
                             f"{tuple(q.shape)} and g_idx {tuple(g.shape)} against K = {K}")
        if not torch.equal(g, parts[0][3]):
            raise ValueError("weights to fuse need the same g_idx (act order): fuse only "
                             "Linears quantized with one column order")
        if s.shape != z.shape or s.shape[0] != q.shape[0]:
            raise ValueError(f"scales {tuple(s.shape)} and zeros {tuple(z.shape)} do not fit "
                             f"codes {tuple(q.shape)}")
    if group_size <= 0 or group_size < K and group_size % TILE_K and TILE_K % group_size:
        raise ValueError(f"group_size {group_size}: the native layout needs groups that are a "
                         f"multiple or a divisor of {TILE_K} columns")
    q = torch.cat([p[0] for p in parts])
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"codes must lie in [0, 15] for the INT4 layout; got "
                         f"[{int(q.min())}, {int(q.max())}]")
    scales = torch.cat([p[1] for p in parts])
    zeros = torch.cat([p[2] for p in parts])
    N = q.shape[0]
    splits = [0]
    for p in parts[:-1]:
        splits.append(splits[-1] + p[0].shape[0])
    perm = _sorted_columns(parts[0][3], group_size, K)
    if perm is not None:
        q = q[:, perm.long()]
    return NativeInt4(
        words=_pack_fragments(_fragments(q), 4),
        scales=_scale_order(_pad_to(scales.t().to(torch.float16), 1, TILE_N)),
        zeros=_scale_order(_pad_to(zeros.t().to(torch.uint8), 1, TILE_N)),
        perm=perm, out_features=N, in_features=K, group_size=group_size, splits=splits)


def _fragments(q: Tensor) -> Tensor:
    """[N, C] values -> long [N_pad/16, C_pad/64, 32, 4, 8]: each tile's values by lane, step
    and fragment element (zero padding)."""
    q = _pad_to(_pad_to(q.to(torch.int64), 0, TILE_N), 1, TILE_K)
    Nt, Kt = q.shape[0] // TILE_N, q.shape[1] // TILE_K
    tiles = q.reshape(Nt, TILE_N, Kt, TILE_K).permute(0, 2, 1, 3)  # [Nt, Kt, 16, 64]
    return tiles[:, :, _ROW, _COL]


def _unfragments(frag: Tensor, N: int, C: int) -> Tensor:
    """Inverse of :func:`_fragments`: long [N, C]."""
    Nt, Kt = frag.shape[:2]
    tiles = torch.empty(Nt, Kt, TILE_N, TILE_K, dtype=torch.int64)
    tiles[:, :, _ROW, _COL] = frag
    return tiles.permute(0, 2, 1, 3).reshape(Nt * TILE_N, Kt * TILE_K)[:N, :C]


def _pack_fragments(frag: Tensor, bits: int) -> Tensor:
    """Fragments [.., 4, 8] -> int32 words: 4 bits: [.., 4], one word per step; 2 bits:
    [.., 2], steps 2w and 2w + 1 in the low and high halves of word w. Element j sits at
    field ``_NIBBLE_OF[j]``."""
    shifts = bits * torch.tensor(_NIBBLE_OF, dtype=torch.int64)
    word = (frag << shifts).sum(-1)  # fields never overlap: the sum is the OR
    if bits == 2:
        word = word[..., 0::2] | (word[..., 1::2] << 16)
    return to_int32(word).contiguous()


def _unpack_fragments(words: Tensor, bits: int) -> Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    if bits == 2:
        w = torch.stack([w & 0xFFFF, w >> 16], -1).flatten(-2)
    shifts = bits * torch.tensor(_NIBBLE_OF, dtype=torch.int64)
    return (w[..., None] >> shifts) & (2**bits - 1)


def _scale_order(x: Tensor) -> Tensor:
    G, Np = x.shape
    return x.reshape(G, Np // TILE_N, TILE_N)[:, :, _SCALE_ROWS].reshape(G, Np).contiguous()


def _scale_unorder(x: Tensor) -> Tensor:
    G, Np = x.shape
    out = torch.empty_like(x).reshape(G, Np // TILE_N, TILE_N)
    out[:, :, _SCALE_ROWS] = x.reshape(G, Np // TILE_N, TILE_N)
    return out.reshape(G, Np)


def _qparams(w: NativeInt4) -> tuple[Tensor, Tensor]:
    """Scales fp16 and zeros int32, [N, G], back in row order."""
    N = w.out_features
    scales = _scale_unorder(w.scales)[:, :N].t().contiguous()
    return scales, _scale_unorder(w.zeros)[:, :N].t().to(torch.int32).contiguous()


def unpack_native(w: NativeInt4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The inverse of :func:`repack_native`: codes uint8 [N, K], scales fp16 [N, G], zeros
    int32 [N, G] and ``g_idx`` int32 [K], in the original column order."""
    if w.meta is not None:
        raise ValueError("a 2:4 native weight: use unpack_native_24")
    N, K = w.out_features, w.in_features
    q = _unfragments(_unpack_fragments(w.words, 4), N, K)
    g_idx = torch.arange(K, dtype=torch.int32) // w.group_size
    if w.perm is not None:
        inv = torch.empty(K, dtype=torch.int64)
        inv[w.perm.long()] = torch.arange(K)
        q = q[:, inv]
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[w.perm.long()] = torch.arange(K, dtype=torch.int32) // w.group_size
    return (q.to(torch.uint8).contiguous(), *_qparams(w), g_idx)


def dequantize_native(w: NativeInt4) -> Tensor:
    """The dense weight [N, K] in fp32 (original column order): ``(q - z) * s`` (a 2:4
    weight's pruned entries exactly 0)."""
    if w.meta is not None:
        return _dequantize_24(w)
    q, s, z, g = unpack_native(w)
    g = g.long()
    return (q.float() - z[:, g].float()) * s[:, g].float()


def native_matmul_ref(x: Tensor, w: NativeInt4) -> Tensor:
    """``x @ W^T`` read from the native layout in fp32: the reference a kernel on it is
    checked against; the output has ``x``'s dtype."""
    return (x.float() @ dequantize_native(w).t()).to(x.dtype)


PREFILL_MAX = 256  # rows of x up to which the native kernel runs; above, a dense matmul


def native_matmul(x: Tensor, w: NativeInt4, tiles: int = 2) -> Tensor:
    """``x [..., K] @ W^T -> [..., N]`` on the native layout: on CUDA (or under
    ``TRITON_INTERPRET=1``) the Triton kernel for up to 256 rows of x (decode up to 16, with
    ``tiles`` 16-row tiles of W per program; prefill above), and above 256 rows the weight
    dequantized once into x's dtype for a dense (cuBLAS) matmul; elsewhere
    :func:`native_matmul_ref`."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features; the weight takes {w.in_features}")
    if not use_triton(x.device.type):
        return native_matmul_ref(x, w)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    if x2.shape[0] > PREFILL_MAX:
        out = x2 @ dequantize_native(w).to(x.dtype).t()
        return out.reshape(*lead, w.out_features)
    from llmc.kernels._native_triton import launch

    x2 = x2.contiguous()
    out = launch(x2, w.words, w.scales, w.zeros, w.perm, w.out_features, w.in_features,
                 w.group_size, tiles=tiles, meta=w.meta)
    return out.reshape(*lead, w.out_features)


def repack_native_24(q: Tensor, W: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor,
                     group_size: int) -> NativeInt4:
    """A 2:4 sparse INT4 weight in the native layout: the two kept slots of every 4 inputs
    (their codes in ``words``, each 16 x 64 tile covering 128 inputs) and their positions
    (``meta``, 2 bits each, same fragment order). ``q`` [N, K] are the codes, ``W`` [N, K]
    the 2:4 weight whose zeros mark the pruned entries (a pruned code is its zero point),
    ``scales``/``zeros`` [N, G] over groups of ``group_size`` inputs (a multiple of 4)."""
    from llmc.core.masks import nm_slots

    N, K = q.shape
    if K % 4 or group_size % 4:
        raise ValueError(f"2:4 needs in_features ({K}) and group_size ({group_size}) divisible "
                         "by 4")
    if not torch.equal(g_idx.long(), torch.arange(K, device=g_idx.device) // group_size):
        raise ValueError("2:4 in the native layout needs the original column order (no act "
                         "order): sorting columns would break the groups of 4")
    if group_size <= 0 or (2 * TILE_K) % group_size and group_size % (2 * TILE_K):
        raise ValueError(f"group_size {group_size}: 2:4 in the native layout needs groups that "
                         f"are a multiple or a divisor of {2 * TILE_K} inputs")
    pos = nm_slots(W, 2, 4)  # [N, K/4, 2], refuses a weight that is not 2:4
    kept = torch.gather(q.to(torch.int64).reshape(N, K // 4, 4), -1, pos).reshape(N, K // 2)
    # slot c's inputs are 4 (c // 2) .. 4 (c // 2) + 3, in group c // (group_size / 2)
    half = group_size // 2
    dense = repack_native(kept, scales, zeros,
                          torch.arange(K // 2, dtype=torch.int32) // half, half)
    dense.in_features = K
    dense.group_size = group_size
    dense.meta = _pack_fragments(_fragments(pos.reshape(N, K // 2)), 2)
    return dense


def unpack_native_24(w: NativeInt4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The inverse of :func:`repack_native_24`: kept codes uint8 [N, K/2], positions long
    [N, K/4, 2], scales fp16 [N, G] and zeros int32 [N, G]."""
    if w.meta is None:
        raise ValueError("not a 2:4 native weight: use unpack_native")
    N, K = w.out_features, w.in_features
    kept = _unfragments(_unpack_fragments(w.words, 4), N, K // 2)
    pos = _unfragments(_unpack_fragments(w.meta, 2), N, K // 2).reshape(N, K // 4, 2)
    return (kept.to(torch.uint8).contiguous(), pos, *_qparams(w))


def _dequantize_24(w: NativeInt4) -> Tensor:
    kept, pos, s, z = unpack_native_24(w)
    N, K = w.out_features, w.in_features
    g = (torch.arange(K // 2) // 2 * 4) // w.group_size  # a slot's group: its 4 inputs'
    vals = (kept.float() - z[:, g].float()) * s[:, g].float()
    dense = torch.zeros(N, K // 4, 4)
    dense.scatter_(-1, pos, vals.reshape(N, K // 4, 2))
    return dense.reshape(N, K)


def from_quant_linear(ql: Any) -> NativeInt4:
    """The native layout of a 4-bit :class:`~llmc.nn.QuantLinear` (GPTQ-layout buffers, as
    ``llmc.load(packed=True)`` builds them): what a load in this layout converts, once."""
    return from_quant_linears([ql])


def from_quant_linears(qls: list[Any]) -> NativeInt4:
    """Sibling 4-bit QuantLinears (same in_features, group size and ``g_idx``) as one native
    weight, their rows concatenated (:func:`repack_fused`), on the first one's device."""
    for ql in qls:
        if ql.bits != 4:
            raise ValueError(f"the native layout holds 4-bit codes; this layer has {ql.bits}")
    parts = []
    for ql in qls:
        qw = ql.quantized()
        parts.append((qw.q.cpu(), qw.scales.cpu(), qw.zeros.cpu(), qw.g_idx.cpu()))
    first = qls[0]
    group_size = first.group_size if first.group_size > 0 else first.in_features
    return repack_fused(parts, group_size).to(first.qweight.device)
