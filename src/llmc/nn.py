"""Modules that hold compressed weights and call the kernels.

- :class:`QuantLinear`: packed 2/3/4/8-bit weights in the GPTQ layout (zeros stored as they
  are) with scales and ``g_idx``; the Triton kernel on CUDA, the ``*_ref`` path elsewhere.
- :class:`SparseLinear`: a 2:4 weight stored compressed (kept values and 2-bit positions);
  the Triton kernel at decode-sized M, ``torch.sparse.to_sparse_semi_structured`` for large M
  on GPUs that support it, the ``*_ref`` path elsewhere.
- :class:`SparseQuantLinear`: the joint 2:4 + INT4 form (kept entries as 4-bit codes with
  group scales and zero points, plus their positions); its Triton kernel, or the ``*_ref``
  path.
- :class:`W8A8Linear`: FP8 or INT8 weights per output channel with the input quantized per
  token in the forward, multiplied by ``torch._scaled_mm`` / ``torch._int_mm``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmc.core.pack import pack_cols, pack_rows, packed_len, unpack_cols, unpack_rows
from llmc.core.scheme import QuantizedWeight, QuantScheme
from llmc.kernels import ops, use_triton
from llmc.kernels.native import NativeInt4
from llmc.kernels.sparse24 import (
    compress_24,
    compress_24_codes,
    expand_24_quant_ref,
    expand_24_ref,
    sparse24_matmul,
    sparse24_matmul_ref,
    sparse24_quant_matmul,
)
from llmc.kernels.wq_matmul import KERNEL_BITS, dequantize_ref, wq_matmul


def _finish(y: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """A module's output: plus its bias, in the input's dtype."""
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


class QuantLinear(nn.Module):
    """``y = x @ dequant(W)^T + b`` with W [N, K] kept packed: ``qweight`` int32
    [ceil(K * bits / 32), N], ``qzeros`` int32 [G, ceil(N * bits / 32)] (zero points as they
    are), ``scales`` [G, N] and ``bias`` [N] in ``dtype``, ``g_idx`` int32 [K]."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 sym: bool = True, bias: bool = False, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        scheme = QuantScheme(bits, group_size, sym)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        G = scheme.num_groups(in_features)
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(packed_len(in_features, bits), out_features,
                                                    dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(G, packed_len(out_features, bits),
                                                   dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=dtype, **kw))
        self.register_buffer("g_idx", scheme.default_g_idx(in_features).to(kw["device"]))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias
                             else None)
        self._check_groups()

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None = None,
                       dtype: torch.dtype = torch.float16) -> QuantLinear:
        N, K = qw.shape
        m = cls(K, N, qw.bits, qw.group_size, qw.sym, bias is not None, dtype)
        m.qweight.copy_(pack_rows(qw.q.t().to(torch.int32), qw.bits))
        m.qzeros.copy_(pack_cols(qw.zeros.t().contiguous().to(torch.int32), qw.bits))
        m.scales.copy_(qw.scales.t())
        m.g_idx.copy_(qw.g_idx)
        m._check_groups()
        if bias is not None:
            m.bias.copy_(bias)
        return m

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "g_idx" in state_dict:
            self._check_groups()

    def _check_groups(self) -> bool:
        """:attr:`trivial_groups`, cached per g_idx tensor and version (an in-place change
        or a move is seen on the next eager call; a g_idx on the meta device counts as not
        trivial). ``torch.compile`` reads the cached answer: it cannot trace the check."""
        key = (self.g_idx.data_ptr(), self.g_idx._version)
        if self.__dict__.get("_trivial_key") != key:
            trivial = self.g_idx.device.type != "meta" and self.trivial_groups
            self._trivial_key, self._trivial = key, trivial
        return self._trivial

    def quantized(self) -> QuantizedWeight:
        """The integer form (codes [N, K], qparams [N, G]), exactly as packed."""
        q = unpack_rows(self.qweight, self.bits, self.in_features).t()
        zeros = unpack_cols(self.qzeros, self.bits, self.out_features).t()
        return QuantizedWeight(
            q=q.to(torch.uint8).contiguous(), scales=self.scales.float().t().contiguous(),
            zeros=zeros.contiguous(), g_idx=self.g_idx.clone(), bits=self.bits,
            group_size=self.group_size, sym=self.sym,
        )

    @property
    def trivial_groups(self) -> bool:
        width = QuantScheme(self.bits, self.group_size, self.sym).group_width(self.in_features)
        expect = torch.arange(self.in_features, device=self.g_idx.device) // width
        return bool(torch.equal(self.g_idx.long(), expect))

    def dequantize(self) -> Tensor:
        """The dense weight [N, K] in fp32 (for inspection; forward never builds it on GPU)."""
        return dequantize_ref(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits,
                              self.in_features)

    native = None  # a NativeInt4 once use_native_layout() ran (not in the state dict)
    fused = None  # a _Fused group (with fused_index) once fuse_native() put it in one

    def use_native_layout(self) -> None:
        """Also keep the weight in the kernel-native layout (:mod:`llmc.kernels.native`, 4-bit
        only): calls then run on it (the decode kernel up to 16 rows of x, the prefill kernel
        up to 256, the weight dequantized once for a dense matmul above; compiled, as one
        custom op). The GPTQ-layout buffers stay: they are the state dict."""
        from llmc.kernels.native import from_quant_linear

        self.native = from_quant_linear(self)

    def forward(self, x: Tensor) -> Tensor:
        """The kernel computes in the scales' dtype (fp16 by default) with fp32 accumulation;
        the ``*_ref`` path in fp32. The output has x's dtype."""
        if self.fused is not None and use_triton(x.device.type):
            y = self.fused.output(self.fused_index, x, self.scales.dtype)
        elif self.native is not None and use_triton(x.device.type):
            y = _native_call(x.to(self.scales.dtype), self.native)
        elif self.bits in KERNEL_BITS and use_triton(x.device.type):
            compiling = torch.compiler.is_compiling()  # then one opaque op per call
            trivial = self._trivial if compiling else self._check_groups()
            gs = self.group_size if trivial and self.group_size != -1 else 0  # 0: use g_idx
            mm = ops.wq_matmul_op if compiling else wq_matmul
            y = mm(x.to(self.scales.dtype), self.qweight, self.scales, self.qzeros, self.g_idx,
                   self.bits, gs)
        else:
            y = x.float() @ self.dequantize().t()
        return _finish(y, self.bias, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, sym={self.sym}")


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` with a 2:4 W [N, K] stored as ``values`` [N, K/2] (``dtype``) and
    ``meta`` int32 [N, K/32] (see :mod:`llmc.kernels.sparse24`)."""

    # Above this many rows of x, the semi-structured tensor-core path wins where it exists.
    LARGE_M = 16

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % 32:
            raise ValueError(f"2:4 storage needs in_features divisible by 32, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=dtype,
                                                   device=device))
        self.register_buffer("meta", torch.zeros(out_features, in_features // 32,
                                                 dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device)
                             if bias else None)
        self._semi = None

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None,
                   dtype: torch.dtype = torch.float16) -> SparseLinear:
        N, K = weight.shape
        m = cls(K, N, bias is not None, dtype, weight.device)
        values, meta = compress_24(weight.detach().to(dtype))
        m.values.copy_(values)
        m.meta.copy_(meta)
        if bias is not None:
            m.bias.copy_(bias)
        return m

    def dense_weight(self) -> Tensor:
        return expand_24_ref(self.values, self.meta)

    def _semi_structured(self) -> Tensor | None:
        """The weight as ``torch.sparse`` semi-structured (cached), or None where the GPU or
        torch build lacks it."""
        if self._semi is None:
            try:
                from torch.sparse import to_sparse_semi_structured

                self._semi = to_sparse_semi_structured(self.dense_weight())
            except (RuntimeError, ValueError, ImportError, NotImplementedError):
                self._semi = False
        return self._semi or None

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(self.values.dtype)
        rows = h.numel() // max(h.shape[-1], 1)
        if h.is_cuda and rows > self.LARGE_M and (w := self._semi_structured()) is not None:
            y = torch.nn.functional.linear(h.reshape(rows, -1), w).reshape(*h.shape[:-1], -1)
        elif use_triton(x.device.type):
            mm = ops.sparse24_matmul_op if torch.compiler.is_compiling() else sparse24_matmul
            y = mm(h, self.values, self.meta)
        else:
            y = sparse24_matmul_ref(x.float(), self.values, self.meta)
        return _finish(y, self.bias, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4"


class SparseQuantLinear(nn.Module):
    """``y = x @ W^T + b`` with W [N, K] both 2:4 sparse and 4-bit quantized, stored as the
    kept entries' codes ``qvalues`` int32 [K/16, N], ``meta`` int32 [K/32, N], ``scales``
    [G, N] and ``qzeros`` int32 [G, N/8] (see :mod:`llmc.kernels.sparse24`): about 0.19 of the
    fp16 weight's bytes at group 128."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128,
                 sym: bool = True, bias: bool = False, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % 32:
            raise ValueError(f"2:4 storage needs in_features divisible by 32, got {in_features}")
        if group_size != -1 and group_size % 4:
            raise ValueError(f"the joint 2:4 + INT4 form needs group_size -1 or a multiple of "
                             f"4, got {group_size}")
        scheme = QuantScheme(4, group_size, sym)
        G = scheme.num_groups(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.sym = group_size, sym
        kw = {"device": device}
        self.register_buffer("qvalues", torch.zeros(in_features // 16, out_features,
                                                    dtype=torch.int32, **kw))
        self.register_buffer("meta", torch.zeros(in_features // 32, out_features,
                                                 dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=dtype, **kw))
        self.register_buffer("qzeros", torch.zeros(G, packed_len(out_features, 4),
                                                   dtype=torch.int32, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias
                             else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None = None,
                       dtype: torch.dtype = torch.float16) -> SparseQuantLinear:
        """From 4-bit codes whose dequantized weight is 2:4 (pruned entries at their zero
        point, as SparseGPT's joint mode and masked GPTQ/RTN/AWQ leave them), with the
        default ``g_idx``; refuses anything else."""
        N, K = qw.shape
        if qw.bits != 4:
            raise ValueError(f"the joint 2:4 form holds 4-bit codes, got {qw.bits}-bit")
        scheme = QuantScheme(4, qw.group_size, qw.sym)
        if not torch.equal(qw.g_idx.long().cpu(), scheme.default_g_idx(K).long()):
            raise ValueError("the joint 2:4 form needs the default g_idx (no act order)")
        m = cls(K, N, qw.group_size, qw.sym, bias is not None, dtype)
        qvalues, meta = compress_24_codes(qw.q, qw.dequantize())
        m.qvalues.copy_(qvalues)
        m.meta.copy_(meta)
        m.scales.copy_(qw.scales.t())
        m.qzeros.copy_(pack_cols(qw.zeros.t().contiguous().to(torch.int32), 4))
        if bias is not None:
            m.bias.copy_(bias)
        return m

    @classmethod
    def from_quant_linear(cls, ql: QuantLinear) -> SparseQuantLinear:
        return cls.from_quantized(ql.quantized(), ql.bias, ql.scales.dtype)

    def dequantize(self) -> Tensor:
        return expand_24_quant_ref(self.qvalues, self.meta, self.scales, self.qzeros,
                                   self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        if use_triton(x.device.type):
            mm = (ops.sparse24_quant_matmul_op if torch.compiler.is_compiling()
                  else sparse24_quant_matmul)
            y = mm(x.to(self.scales.dtype), self.qvalues, self.meta, self.scales, self.qzeros,
                   self.group_size)
        else:
            y = x.float() @ self.dequantize().t()
        return _finish(y, self.bias, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, 2:4, "
                f"bits=4, group_size={self.group_size}, sym={self.sym}")


class W8A8Linear(nn.Module):
    """``y = Q(x) @ W^T * (s_x s_w) + b`` with real 8-bit matmuls: ``weight`` FP8 E4M3 or INT8
    [N, K] with one float32 scale per output channel (``weight_scale`` [N]), the input
    quantized per token in the forward (:func:`llmc.kernels.act_quant.quant_per_token`, the
    Triton kernel on CUDA). FP8 multiplies with ``torch._scaled_mm`` (row-wise scales), INT8
    with ``torch._int_mm`` (int32 accumulation) where its shape rules hold (M > 16, K and N
    multiples of 8), in float32 otherwise. What the fake-quantized model computes, up to the
    matmul's accumulation order."""

    def __init__(self, in_features: int, out_features: int, kind: str = "float",
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if kind not in ("float", "int"):
            raise ValueError(f"kind: {kind!r} is not float (FP8) or int (INT8)")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        code = torch.float8_e4m3fn if kind == "float" else torch.int8
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=code,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32,
                                                        device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device)
                             if bias else None)

    @staticmethod
    def supports(qw: QuantizedWeight, act) -> bool:
        """Whether a quantized Linear (and its activation scheme) runs as this module: 8-bit
        weights per output channel, symmetric, with dynamic per-token inputs of their type."""
        return (act is not None and act.bits == 8 and act.strategy == "token"
                and act.dynamic is True and act.type == qw.type and qw.bits == 8
                and qw.group_size == -1 and qw.sym and not qw.block_rows)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None = None,
                       dtype: torch.dtype = torch.float32) -> W8A8Linear:
        N, K = qw.shape
        m = cls(K, N, qw.type, bias is not None, dtype)
        code = qw.q if qw.type == "float" else (qw.q.to(torch.int16) - 128).to(torch.int8)
        m.weight.copy_(code)
        m.weight_scale.copy_(qw.scales.reshape(N))
        if bias is not None:
            m.bias.copy_(bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        from llmc.kernels.act_quant import quant_per_token

        lead = x.shape[:-1]
        q, s = quant_per_token(x.reshape(-1, self.in_features), self.kind)
        M, K, N = q.shape[0], self.in_features, self.out_features
        if self.kind == "float":
            out = torch.bfloat16 if q.is_cuda else torch.float32  # row-wise scaling on CUDA
            y = torch._scaled_mm(q, self.weight.t(), scale_a=s,
                                 scale_b=self.weight_scale.view(1, N), out_dtype=out).float()
        else:
            if M > 16 and K % 8 == 0 and N % 8 == 0:
                acc = torch._int_mm(q, self.weight.t()).float()
            else:
                acc = q.float() @ self.weight.float().t()
            y = acc * s * self.weight_scale.view(1, N)
        return _finish(y.reshape(*lead, N), self.bias, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kind={self.kind}")


def _native_call(x: Tensor, w: NativeInt4) -> Tensor:
    """``x @ W^T`` on a native weight: one custom op while compiling, the function else."""
    if torch.compiler.is_compiling():
        return ops.native_op(x, w)
    from llmc.kernels.native import native_matmul

    return native_matmul(x, w)


class _Fused:
    """Sibling 4-bit QuantLinears that read the same input (q/k/v, gate/up) as one native
    weight, their rows concatenated: the first member called with an input computes every
    member's output in one matmul, each member takes its rows, and once all have, the result
    is let go. A member called with another input (or twice) computes the group again, so
    the answer never depends on the call order."""

    def __init__(self, members: list[QuantLinear]) -> None:
        from llmc.kernels.native import from_quant_linears

        self.native = from_quant_linears(members)
        ends = [*self.native.splits[1:], self.native.out_features]
        self.rows = list(zip(self.native.splits, ends))
        self.everyone = (1 << len(members)) - 1
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.taken = 0

    def output(self, i: int, x: Tensor, dtype: torch.dtype) -> Tensor:
        """Member ``i``'s output for input ``x`` (before its bias)."""
        if self.x is not x or self.taken >> i & 1:
            self.y = _native_call(x.to(dtype), self.native)
            self.x, self.taken = x, 0
        self.taken |= 1 << i
        lo, hi = self.rows[i]
        y = self.y[..., lo:hi]
        if self.taken == self.everyone:
            self.x = self.y = None
        return y


def fuse_native(model: nn.Module, groups: list[list[str]]) -> int:
    """Run each group of sibling 4-bit QuantLinears (full module names; those that read the
    same input, e.g. a block's q/k/v and gate/up) as one native matmul (:class:`_Fused`).
    Groups of one, and groups whose members differ in input width, group size or column
    order (act order), stay as they are. Returns how many groups were fused."""
    n = 0
    for names in groups:
        try:
            members = [model.get_submodule(name) for name in names]
        except AttributeError:  # not in this model (a packed expert stack, say)
            continue
        if len(members) < 2 or not all(isinstance(m, QuantLinear) and m.bits == 4
                                       for m in members):
            continue
        first = members[0]
        if any(m.in_features != first.in_features or m.group_size != first.group_size
               or not torch.equal(m.g_idx, first.g_idx) for m in members[1:]):
            continue
        fused = _Fused(members)
        for i, m in enumerate(members):
            m.fused, m.fused_index = fused, i
            m.native = None  # the group's weight has its rows
        n += 1
    return n


def use_native_layout(model: nn.Module) -> int:
    """:meth:`QuantLinear.use_native_layout` on every 4-bit QuantLinear of ``model`` that no
    fused group (:func:`fuse_native`) holds already; returns how many run on the native
    layout, fused ones included."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.bits == 4:
            if m.fused is None:
                m.use_native_layout()
            n += 1
    return n
