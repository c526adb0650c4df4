"""Quantization schemes and the primitives every quantizer shares.

A weight ``W`` of shape ``[N, K]`` (out_features, in_features) is quantized per output row
and per group of input columns. ``g_idx[k]`` names the group of column ``k``; each group has
one scale and one integer zero point per row:

    q[n, k]  = clamp(round(W[n, k] / scale[n, g]) + zero[n, g], 0, 2^bits - 1),  g = g_idx[k]
    W'[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]

Symmetric schemes use the GPTQ convention ``zero = 2^(bits-1)``, so ``q - zero`` lies in
``[-2^(bits-1), 2^(bits-1) - 1]``, and by default ``scale = 2 amax / (2^bits - 1)``: the
group's largest magnitude sits half a step beyond the grid's short end (clipped there when it
is positive). ``full_range`` instead maps the largest magnitude onto the grid's long end,
``-2^(bits-1)``, exactly: ``scale = -w_max / 2^(bits-1)``, where ``w_max`` is the group's weight
of largest magnitude, so the scale is negative when that weight is positive (llama.cpp's and
AutoRound's symmetric grid; a finer step, and no weight clipped). The stored layout is the
same; only the scales differ. A group size that does not divide ``K`` leaves a narrower last
group.

Floating-point schemes (``type="float"``, 8 bits: FP8 E4M3) put ``W / scale`` on the E4M3 grid
instead of the integers: the codes ``q`` are ``float8_e4m3fn`` values, zero points are 0 and the
scale of a group is ``amax / 448``, so ``W' = q * scale`` with the same formula.

NVFP4 (``type="float"``, 4 bits, groups of 16) puts ``W / scale`` on the E2M1 grid
(0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives, kept as ``float8_e4m3fn`` codes, which hold
them exactly). Each group's scale is an E4M3 number divided by the tensor's FP32 global scale
``g = 448 * 6 / amax(W)``: ``scale = e4m3(g * amax_group / 6) / g`` (compressed-tensors'
convention). :meth:`QuantScheme.for_weight` fixes ``g`` from a weight before its groups are
quantized.

FP8 block scales (``block_rows``, e.g. 128 with ``group_size`` 128: DeepSeek's 128 x 128
blocks) share one scale between ``block_rows`` consecutive rows of a group: each row's scale is
computed as usual, then the block takes the largest (its ``amax / 448``). Scales stay [N, G]
in memory, equal within a block; the writer keeps one per block.

MXFP4 (``type="float"``, 4 bits, groups of 32) uses the same E2M1 grid with power-of-two
(E8M0) group scales and no global scale: ``scale = 2^(e - 2)`` where ``2^e`` is ``amax``
rounded to a power of two, up when its mantissa is at least 1.75 (compressed-tensors' rounding;
``amax / scale`` then lies in [3.5, 7) and the few values above 6 clip).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
FP4_MAX = 6.0  # the largest E2M1 value
FP4_GROUP = 16  # NVFP4's group width
MX_GROUP = 32  # MXFP4's group width
WEIGHT_TYPES = ("int", "float")
FP4_LEVELS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # E2M1's magnitudes


def round_fp4(x: Tensor) -> Tensor:
    """``x`` (float32, already within [-6, 6]) rounded to the nearest E2M1 value; a tie goes to
    the value with the even mantissa (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4)."""
    # E2M1's spacing is 0.5 below 2, 1 below 4 and 2 up to 6: half the power of two at or
    # below |x| (its float32 exponent bits), clamped to [1, 4]. |x| / step is then rounded
    # half-to-even, which is the even mantissa, and scaled back; all of it exact.
    a = x.abs()
    step = (a.view(torch.int32) & 0x7F800000).view(torch.float32).clamp_(1.0, 4.0).mul_(0.5)
    return torch.copysign(_round_half_even_(a.div_(step)).mul_(step), x)


@dataclass(frozen=True)
class QuantScheme:
    """Weight quantization: integer (``bits`` in 2..8, symmetric or asymmetric) or
    floating-point (``type="float"``: 8 bits, FP8 E4M3, symmetric), ``group_size`` columns per
    scale (-1 = one scale per output channel)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    type: str = "int"
    global_scale: float = 0.0  # NVFP4: the weight's FP32 global scale (0: not fixed yet)
    block_rows: int = 0  # FP8 block scales: rows per block (0: a scale per row)
    full_range: bool = False  # symmetric int: the largest magnitude on the grid's long end

    def __post_init__(self) -> None:
        if self.full_range and (self.type != "int" or not self.sym):
            raise ValueError("full_range: only symmetric integer grids have a long end; drop "
                             "full_range or use sym true with an integer type")
        if self.block_rows and (self.type != "float" or self.bits != 8 or self.group_size < 1
                                or self.block_rows < 1):
            raise ValueError(f"block_rows: {self.block_rows} needs FP8 weights in groups "
                             "(type float, bits 8, group_size e.g. 128)")
        if self.type not in WEIGHT_TYPES:
            raise ValueError(f"type: {self.type!r} is not one of {', '.join(WEIGHT_TYPES)}")
        if self.type == "float" and (
                self.bits not in (4, 8) or not self.sym
                or (self.bits == 4 and self.group_size not in (FP4_GROUP, MX_GROUP))):
            raise ValueError(
                f"type float: bits {self.bits}, group_size {self.group_size}, sym {self.sym} "
                "is not supported; floating-point weights are FP8 E4M3 (bits 8), NVFP4 "
                "(bits 4, group_size 16) or MXFP4 (bits 4, group_size 32), symmetric")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits: {self.bits!r} is not supported; use an integer from 2 to 8")
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or (self.group_size != -1 and self.group_size < 1)
        ):
            raise ValueError(
                f"group_size: {self.group_size!r} is not valid; use a positive integer "
                "(e.g. 128) or -1 for one group per output channel"
            )

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def is_float(self) -> bool:
        return self.type == "float"

    @property
    def is_fp4(self) -> bool:
        """On the E2M1 grid: NVFP4 or MXFP4."""
        return self.type == "float" and self.bits == 4

    @property
    def is_mx(self) -> bool:
        """MXFP4: E2M1 in groups of 32, power-of-two scales."""
        return self.is_fp4 and self.group_size == MX_GROUP

    def for_weight(self, W: Tensor) -> QuantScheme:
        """This scheme with NVFP4's global scale fixed from ``W`` (other schemes: itself)."""
        if not self.is_fp4 or self.is_mx or self.global_scale:
            return self
        amax = float(W.detach().abs().max())
        g = FP8_MAX * FP4_MAX / amax if amax > 0 else 1.0
        return dataclasses.replace(self, global_scale=float(torch.tensor(g, dtype=torch.float32)))

    @property
    def code_dtype(self) -> torch.dtype:
        """The dtype the codes ``q`` are kept in."""
        return torch.float8_e4m3fn if self.is_float else torch.uint8

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_width(in_features))

    def default_g_idx(self, in_features: int) -> Tensor:
        """Group of each input column in the original order: ``k // group_size``."""
        return torch.arange(in_features, dtype=torch.int32) // self.group_width(in_features)


class SchemeKey(NamedTuple):
    """What one quantized Linear was quantized with, as a checkpoint's config records it: the
    weight scheme and the input's :class:`~llmc.core.act.ActScheme` (None: unquantized)."""

    bits: int
    group_size: int
    sym: bool
    type: str
    block_rows: int
    act: Any


@dataclass(frozen=True)
class ClipSearch:
    """Per-group search of the clipping range that minimises the quantization error
    ``sum_k d_k |q_k - w_k|^norm`` (the MSE option of the GPTQ reference, optionally weighted by
    the Hessian diagonal ``d``), over ``grid`` shrink factors down to ``1 - max_shrink``: every
    ``stride``-th factor first, then the neighbours of each group's best (``stride=1``: all)."""

    grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.4
    stride: int = 4

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"clip stride: {self.stride} must be at least 1")
        if self.grid < 1:
            raise ValueError(f"clip grid: {self.grid} must be at least 1")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"clip max_shrink: {self.max_shrink} must lie in [0, 1)")
        if self.norm <= 0:
            raise ValueError(f"clip norm: {self.norm} must be positive")


@dataclass(frozen=True)
class QuantArgs:
    """Recipe arguments shared by the quantizers: the weight scheme, the clipping search, and
    the activation scheme (``act_bits`` 8 quantizes each targeted Linear's input in the forward,
    4 with ``act_type`` float on NVFP4, or MXFP4 with ``act_strategy`` group, see
    :mod:`llmc.core.act`; 16 leaves activations alone)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    type: str = "int"
    clip: bool = False
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.4
    act_bits: int = 16
    act_type: str = "int"
    act_strategy: str = "token"
    act_dynamic: bool = True
    block_rows: int = 0
    full_range: bool = False

    def __post_init__(self) -> None:
        QuantScheme(self.bits, self.group_size, self.sym, self.type, block_rows=self.block_rows,
                    full_range=self.full_range)
        if self.clip:
            ClipSearch(self.clip_grid, self.clip_max_shrink, self.clip_norm)
        if self.act_bits != 16:
            self.act_scheme  # noqa: B018  (validates the activation arguments)

    @property
    def act_scheme(self):
        """The :class:`~llmc.core.act.ActScheme` of the inputs, None when they stay as they
        are."""
        from llmc.core.act import ActScheme

        if self.act_bits == 16:
            return None
        if self.act_bits == 4:  # NVFP4 or MXFP4: their scales are the format's
            if self.act_type != "float":
                raise ValueError("act_bits 4: activations are NVFP4 or MXFP4; use act_type "
                                 "float")
            if self.act_strategy == "group":  # MXFP4: dynamic power-of-two scales per 32
                return ActScheme("float", "group", True, 4)
            if self.act_strategy not in ("token", "tensor_group"):
                raise ValueError(f"act_bits 4: act_strategy {self.act_strategy!r} is neither "
                                 "NVFP4's (tensor_group, the default at 4 bits) nor MXFP4's "
                                 "(group)")
            return ActScheme("float", "tensor_group", "local", 4)
        return ActScheme(self.act_type, self.act_strategy, self.act_dynamic, self.act_bits)

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size, self.sym, self.type,
                           block_rows=self.block_rows, full_range=self.full_range)

    @property
    def clip_search(self) -> ClipSearch | None:
        if not self.clip:
            return None
        return ClipSearch(self.clip_grid, self.clip_max_shrink, self.clip_norm)


@dataclass
class QuantState:
    """The qparams of a quantized weight [N, K]: scales [N, G] float32 (fp16-representable),
    integer zero points [N, G] (int32), and the group of each input column, g_idx [K] (int32).

    A quantized Linear keeps this beside its dense (dequantized) weight; the integer codes are
    recovered from the weight when a writer needs them, exactly: for ``W = (q - z) * s`` in
    float32, ``round(W / s) == q - z`` while ``|q - z| < 2^22``."""

    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    group_size: int
    sym: bool
    type: str = "int"
    global_scale: float = 0.0
    block_rows: int = 0

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size, self.sym, self.type, self.global_scale,
                           self.block_rows)

    def codes(self, W: Tensor, name: str = "weight") -> QuantizedWeight:
        """The integer (or FP8) form of the dense weight ``W``; refuses a weight that left the
        grid."""
        maxq = 2**self.bits - 1
        if self.type == "float":
            def fn(w, s, z):
                return (w / s).to(torch.float8_e4m3fn)
        else:
            def fn(w, s, z):
                return _round_half_even_(w / s).add_(z).clamp_(0, maxq)
        q = by_group(W.detach().float(), self.g_idx, self.group_size, fn,
                     self.scales.float(), self.zeros.float(), out_dtype=self.scheme.code_dtype)
        qw = QuantizedWeight(**vars(self), q=q)
        if not torch.equal(qw.dequantize(), W.detach().float()):
            raise ValueError(
                f"{name}: the weight is no longer on its quantization grid (was it cast to a "
                "lower precision or modified after compression?)"
            )
        return qw


@dataclass
class QuantizedWeight(QuantState):
    """Qparams plus the integer codes q: [N, K] in [0, 2^bits - 1] (uint8)."""

    q: Tensor = None  # type: ignore[assignment]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        W = by_group(self.q, self.g_idx, self.group_size,
                     lambda q, s, z: q.to(torch.float32, copy=True).sub_(z).mul_(s),
                     self.scales.float(),
                     self.zeros.float(), out_dtype=torch.float32)
        return W.to(dtype)

    def state(self) -> QuantState:
        return QuantState(self.scales, self.zeros, self.g_idx, self.bits, self.group_size,
                          self.sym, self.type, self.global_scale, self.block_rows)


def qparams_from_range(
    xmin: Tensor, xmax: Tensor, scheme: QuantScheme
) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point (as float) for ranges ``[xmin, xmax]`` that contain 0
    (FP8: ``amax / 448`` in float32, zero 0)."""
    maxq = scheme.maxq
    if scheme.is_mx:
        return mx_scale(torch.maximum(xmin.abs(), xmax)), torch.zeros_like(xmax)
    if scheme.is_fp4:
        if not scheme.global_scale:
            raise ValueError("NVFP4 qparams need the weight's global scale: "
                             "use scheme.for_weight(W)")
        g = scheme.global_scale
        amax = torch.maximum(xmin.abs(), xmax)
        s8 = (amax / FP4_MAX * g).clamp_(max=FP8_MAX).to(torch.float8_e4m3fn).float()
        s8 = torch.where(s8 == 0, torch.full_like(s8, 2.0**-9), s8)  # E4M3's smallest
        return s8 / g, torch.zeros_like(amax)
    if scheme.is_float:
        amax = torch.maximum(xmin.abs(), xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        return (amax / FP8_MAX).clamp(min=2**-126), torch.zeros_like(amax)
    if scheme.sym:
        amax = torch.maximum(xmin.abs(), xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        if scheme.full_range:  # the largest magnitude onto -2^(bits-1): its sign flips s
            scale = torch.where(xmax < xmin.abs(), amax, -amax) / ((maxq + 1) // 2)
        else:
            scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        degenerate = (xmin == 0) & (xmax == 0)
        xmin = torch.where(degenerate, -torch.ones_like(xmin), xmin)
        xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
        scale = (xmax - xmin) / maxq
        zero = round_half_even((-xmin / scale).clamp(0, maxq))
    # Checkpoints store scales in fp16: quantize against the stored value so that the
    # in-memory model and the saved one are bit-identical.
    scale = torch.copysign(scale.abs().clamp(min=2**-24), scale).to(torch.float16).float()
    return scale, zero


def mx_scale(amax: Tensor) -> Tensor:
    """MXFP4's power-of-two scale of groups with maxima ``amax`` (see the module docstring):
    the float32 bits of ``amax`` plus half of E2M1's mantissa step, masked to the exponent,
    give ``2^e``; the scale is ``2^(e - 2)`` (1 for an all-zero group)."""
    a = amax.float().contiguous()
    p2 = ((a.view(torch.int32) + (1 << 21)) & 0x7F800000).view(torch.float32)
    return torch.where(a > 0, (p2 / 4).clamp(min=2.0**-126), torch.ones_like(a))


_MAGIC = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds a float32 half-to-even


def round_half_even(x: Tensor) -> Tensor:
    """``torch.round`` for float32 ``|x| < 2^22``. torch 2.13's CPU ``round`` takes milliseconds
    on some vector sizes (seen for 4096 elements); this costs microseconds and agrees exactly."""
    if x.dtype != torch.float32:
        return torch.round(x)
    return (x + _MAGIC) - _MAGIC


def _round_half_even_(x: Tensor) -> Tensor:
    """:func:`round_half_even` in place (``x`` is a fresh float32 intermediate)."""
    if x.dtype != torch.float32:
        return x.round_()
    return x.add_(_MAGIC).sub_(_MAGIC)


def quantize(w: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme) -> Tensor:
    """Codes (as float32) of ``w`` on the grid ``(q - zero) * scale``; broadcasts.
    One new tensor, the rest in place: each pass over a 45M-weight matrix that allocates
    costs about three that do not (page faults)."""
    if scheme.is_fp4:
        return round_fp4((w / scale).clamp_(-FP4_MAX, FP4_MAX))
    if scheme.is_float:
        x = (w / scale).clamp_(-FP8_MAX, FP8_MAX)
        return x.to(torch.float8_e4m3fn).float()
    maxq = scheme.maxq
    x = (w / scale).clamp_(-maxq - 1, maxq + 1)
    return _round_half_even_(x).add_(zero).clamp_(0, maxq)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme) -> Tensor:
    return (quantize(w, scale, zero, scheme) - zero) * scale


_CHUNK = 2**18  # elements per chunk of a row-wise pass that should stay in the CPU's cache


def find_qparams(
    w: Tensor,
    scheme: QuantScheme,
    clip: ClipSearch | None = None,
    importance: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Qparams for each row of ``w`` (shape ``[..., k]``), one group per row.

    Without ``clip`` the range is the row's min/max (widened to contain 0). With ``clip``,
    the range is shrunk by the factor of a grid that minimises ``sum_k d_k |q_k - w_k|^norm``,
    ``d = importance`` (shape ``[k]`` or broadcastable to ``w``; ones when None).
    Returns ``scale, zero`` of shape ``[...]``.
    """
    w = w.float()
    rows = max(1, _CHUNK // max(w[0].numel(), 1))
    if clip is not None and w.dim() >= 2 and w.shape[0] > rows:
        # Rows are independent: the search runs over chunks that stay in the CPU's cache
        # (twice as fast on a 4096 x 4096 weight; the same values).
        parts = [find_qparams(w[i:i + rows], scheme, clip, importance)
                 for i in range(0, w.shape[0], rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    scale, zero = qparams_from_range(xmin, xmax, scheme)
    if clip is None:
        return scale, zero
    steps = max(int(clip.max_shrink * clip.grid), 1)
    best = torch.full_like(scale, float("inf"))
    best_i = torch.zeros_like(scale, dtype=torch.long)

    def try_shrink(i: Tensor | int) -> None:
        nonlocal best, scale, zero, best_i
        p = 1 - torch.as_tensor(i, dtype=w.dtype) / clip.grid
        s, z = qparams_from_range(p * xmin, p * xmax, scheme)
        err = (fake_quantize(w, s[..., None], z[..., None], scheme) - w).abs_()
        err = err.square_() if clip.norm == 2 else err.pow_(clip.norm)
        if importance is not None:
            err = err * importance
        err = err.sum(dim=-1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
        best_i = torch.where(better, torch.as_tensor(i), best_i)

    # Coarse pass over every ``stride``-th shrink factor, then the neighbours of each row's best.
    for i in range(0, steps, clip.stride):
        try_shrink(i)
    coarse = best_i.clone()
    for d in range(1, clip.stride):
        for i in (coarse - d, coarse + d):
            try_shrink(i.clamp(0, steps - 1))
    return scale, zero


def block_qparams(scale: Tensor, zero: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """Per-row qparams ([N] or [N, G]) with each block of ``scheme.block_rows`` rows given its
    largest scale (FP8 block scales); unchanged without blocks."""
    b = scheme.block_rows
    if not b:
        return scale, zero
    N = scale.shape[0]
    pad = -N % b
    s = torch.nn.functional.pad(scale, (0, 0) * (scale.dim() - 1) + (0, pad)) if pad else scale
    s = s.reshape(-1, b, *scale.shape[1:]).amax(dim=1)
    return s.repeat_interleave(b, dim=0)[:N].contiguous(), zero


def grouped_qparams(
    W: Tensor,
    scheme: QuantScheme,
    clip: ClipSearch | None = None,
    importance: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Qparams of every group of ``W`` ([N, K]) in the original column order
    (``g_idx = k // group_size``). Returns ``scales, zeros`` of shape [N, G]; a narrow last
    group is handled on its own."""
    N, K = W.shape
    width = scheme.group_width(K)
    full = K // width
    scales, zeros = [], []
    if full:
        wg = W[:, : full * width].reshape(N, full, width)
        imp = None if importance is None else importance[: full * width].reshape(full, width)
        s, z = find_qparams(wg, scheme, clip, imp)
        scales.append(s)
        zeros.append(z)
    if full * width < K:
        imp = None if importance is None else importance[full * width :]
        s, z = find_qparams(W[:, full * width :], scheme, clip, imp)
        scales.append(s[:, None])
        zeros.append(z[:, None])
    return block_qparams(torch.cat(scales, dim=1), torch.cat(zeros, dim=1), scheme)


def trivial_groups(g_idx: Tensor, group_size: int) -> bool:
    """Whether column k sits in group ``k // group_size`` (no act-order regrouping)."""
    K = g_idx.numel()
    width = K if group_size == -1 else group_size
    return torch.equal(g_idx.long().cpu(), torch.arange(K) // width)


def by_group(
    x: Tensor, g_idx: Tensor, group_size: int,
    fn: Callable[[Tensor, Tensor, Tensor], Tensor], scales: Tensor, zeros: Tensor,
    out_dtype: torch.dtype,
) -> Tensor:
    """``fn(x, scale, zero)`` elementwise over ``x`` [N, K], each column with its group's
    ``scales``/``zeros`` [N, G]. Columns grouped in order (``k // group_size``) are taken as
    views [N, G, width] against [N, G, 1] (no [N, K] gather of the qparams); regrouped
    columns gather. The arithmetic per element is the same either way."""
    N, K = x.shape
    if not trivial_groups(g_idx, group_size):
        g = g_idx.long().to(scales.device)
        return fn(x, scales[:, g], zeros[:, g]).to(out_dtype)
    width = K if group_size == -1 else group_size
    full = K // width
    if full * width == K:
        return fn(x.reshape(N, full, width), scales[:, :, None],
                  zeros[:, :, None]).to(out_dtype).reshape(N, K)
    out = torch.empty(N, K, dtype=out_dtype, device=x.device)
    if full:
        main = x[:, : full * width].reshape(N, full, width)
        out[:, : full * width] = fn(main, scales[:, :full, None],
                                    zeros[:, :full, None]).reshape(N, full * width)
    if full * width < K:
        out[:, full * width :] = fn(x[:, full * width :], scales[:, full:full + 1],
                                    zeros[:, full:full + 1])
    return out


def quantize_dequantize(
    W: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor, scheme: QuantScheme
) -> tuple[QuantizedWeight, Tensor]:
    """:func:`quantize_with_groups` and the dequantized weight together, the same values as
    ``.dequantize()`` bit for bit. Rows go in chunks of about a megabyte, each quantized and
    dequantized while it sits in the CPU's cache (a third faster than whole-matrix passes on
    a 4096 x 11008 weight), into the two outputs allocated once."""
    N, K = W.shape
    width = scheme.group_width(K)
    if not trivial_groups(g_idx, scheme.group_size) or K % width:
        qw = quantize_with_groups(W, scales, zeros, g_idx, scheme)
        return qw, qw.dequantize()
    G = K // width
    Wv = W.float().reshape(N, G, width)
    s, z = scales.float()[:, :, None], zeros.float()[:, :, None]
    q = torch.empty(N, G, width, dtype=scheme.code_dtype, device=W.device)
    dense = torch.empty(N, G, width, dtype=torch.float32, device=W.device)
    rows = max(1, _CHUNK // K)
    for i in range(0, N, rows):
        j = min(i + rows, N)
        x = quantize(Wv[i:j], s[i:j], z[i:j], scheme)
        q[i:j] = x
        dense[i:j] = x.sub_(z[i:j]).mul_(s[i:j])
    qw = QuantizedWeight(q=q.reshape(N, K), scales=scales.float().contiguous(),
                         zeros=zeros.to(torch.int32).contiguous(),
                         g_idx=g_idx.to(torch.int32).contiguous(), bits=scheme.bits,
                         group_size=scheme.group_size, sym=scheme.sym, type=scheme.type,
                         global_scale=scheme.global_scale, block_rows=scheme.block_rows)
    return qw, dense.reshape(N, K)


def rtn_codes(W: Tensor, scheme: QuantScheme, clip: ClipSearch | None = None) -> QuantizedWeight:
    """Round-to-nearest codes of ``W`` ([N, K], any float dtype) in the original column order,
    without its dequantized form: what a streamed data-free run writes. Rows are independent,
    so they go in chunks of about a megabyte, each cast to float32, given its qparams and
    rounded while it sits in the CPU's cache; the values equal :func:`grouped_qparams` then
    :func:`quantize_with_groups` on ``W.float()``, bit for bit."""
    N, K = W.shape
    scheme = scheme.for_weight(W)
    width = scheme.group_width(K)
    g_idx = scheme.default_g_idx(K)
    if K % width or scheme.block_rows:  # a narrow last group, or qparams across rows
        Wf = W.detach().float()
        scales, zeros = grouped_qparams(Wf, scheme, clip)
        return quantize_with_groups(Wf, scales, zeros, g_idx, scheme)
    G = K // width
    Wv = W.detach().reshape(N, G, width)
    q = torch.empty(N, G, width, dtype=scheme.code_dtype, device=W.device)
    scales = torch.empty(N, G, dtype=torch.float32, device=W.device)
    zeros = torch.empty(N, G, dtype=torch.float32, device=W.device)
    rows = max(1, _CHUNK // K)
    fused = scheme.type == "int" and scheme.sym and clip is None
    for i in range(0, N, rows):
        j = min(i + rows, N)
        w = Wv[i:j].float()
        if fused:
            s, z = qparams_from_range(w.amin(dim=-1).clamp_(max=0),
                                      w.amax(dim=-1).clamp_(min=0), scheme)
            # The zero point (2^(bits-1)) is even, so rounding ``w / s + MAGIC + zero`` to an
            # integer rounds ``w / s`` half to even and adds the zero point in one step; the
            # code is then the float's lowest byte (MAGIC's are 0). The clamp to the grid
            # also covers inputs too large for the trick.
            x = (w / s[:, :, None]).add_(_MAGIC + z[0, 0].item())  # w may be W itself
            x.clamp_(_MAGIC, _MAGIC + scheme.maxq)
            q[i:j] = x.view(torch.int32)  # wraps to the low byte
        else:
            s, z = find_qparams(w, scheme, clip)
            q[i:j] = quantize(w, s[:, :, None], z[:, :, None], scheme)
        scales[i:j], zeros[i:j] = s, z
    return QuantizedWeight(q=q.reshape(N, K), scales=scales, zeros=zeros.to(torch.int32),
                           g_idx=g_idx, bits=scheme.bits, group_size=scheme.group_size,
                           sym=scheme.sym, type=scheme.type, global_scale=scheme.global_scale,
                           block_rows=scheme.block_rows)


def quantize_with_groups(
    W: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor, scheme: QuantScheme
) -> QuantizedWeight:
    """Integer codes of ``W`` under given per-group qparams and column groups."""
    q = by_group(W.float(), g_idx, scheme.group_size,
                 lambda w, s, z: quantize(w, s, z, scheme), scales, zeros,
                 out_dtype=scheme.code_dtype)
    return QuantizedWeight(
        q=q,
        scales=scales.float().contiguous(),
        zeros=zeros.to(torch.int32).contiguous(),
        g_idx=g_idx.to(torch.int32).contiguous(),
        bits=scheme.bits,
        group_size=scheme.group_size,
        sym=scheme.sym,
        type=scheme.type,
        global_scale=scheme.global_scale,
        block_rows=scheme.block_rows,
    )


def output_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """Relative layer-output error ``tr(dW H dW^T) / tr(W H W^T)`` with ``dW = W_hat - W``:
    the squared error of the Linear's outputs on the calibration inputs that built ``H``."""
    W, W_hat, H = W.detach().float(), W_hat.detach().float(), H.detach().float()
    dW = W_hat - W
    num = ((dW @ H) * dW).sum()
    den = ((W @ H) * W).sum().clamp(min=1e-30)
    return float(num / den)
