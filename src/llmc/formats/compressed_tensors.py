"""The compressed-tensors checkpoint (``quant_method: compressed-tensors``), writer and reader.

Quantized Linears, format ``pack-quantized`` (``quantization_status: compressed``), per Linear
``{prefix}`` with weight [N, K] (out, in), G groups:

    weight_packed      int32 [N, ceil(K*bits/32)]  code + 2^(bits-1) of the signed value,
                                                   packed along K as one little-endian bit
                                                   stream (code i at bits [bits*i, bits*(i+1)))
    weight_scale       [N, G] (fp16)
    weight_zero_point  int32 [ceil(N*bits/32), G]  asymmetric only; packed along N the same way
    weight_shape       int64 [2]                   (N, K)

Static act-order is ``actorder: weight`` (its ``g_idx`` is trivial). Dynamic act-order would need
``weight_g_idx`` with ``actorder: group``, which compressed-tensors 0.20 no longer accepts, so
the writer refuses it (the reader still reads a ``weight_g_idx``).

llmc's codes ``q`` in ``[0, 2^bits)`` with zero point ``z`` are the package's signed values plus
``2^(bits-1)``, so they are packed as they are. The bit stream is compressed-tensors 0.20's
dense packing; for 2, 4 and 8 bits it is also the older ``32 // bits`` codes per word (3-bit
differs: older versions padded 10 codes per word).

2:4-pruned Linears without quantization, ``sparsity_config.format: sparse-24-bitmask``:

    weight.compressed  [N, K/2]            the two kept entries of every 4, row by row
    weight.bitmask     uint8 [N, ceil(K/8)] which entries were kept (numpy packbits, little)
    weight.shape       int64 [2]

2:4 with quantization is pack-quantized with ``sparsity_config.format: dense`` (the zeros are
codes like any other).

FP8 weights, format ``float-quantized``, and 8-bit integer weights with quantized activations
(W8A8), format ``int-quantized``, are stored unpacked:

    weight             float8_e4m3fn / int8 [N, K]  the code (int8: code - 128)
    weight_scale       float32 [N, G]               (G = 1 per channel)

NVFP4 weights, format ``nvfp4-pack-quantized`` (``strategy: tensor_group``, groups of 16):

    weight_packed        uint8 [N, K/2]         two E2M1 codes per byte (sign in bit 3, the
                                                magnitude's index in 0 0.5 1 1.5 2 3 4 6), the
                                                even column in the low nibble
    weight_scale         float8_e4m3fn [N, K/16] group scale times the global scale
    weight_global_scale  float32 [1]            448 * 6 / amax(W)

MXFP4 (``mxfp4-pack-quantized``, ``strategy: group``, groups of 32, ``scale_dtype: uint8``): the
same ``weight_packed``, ``weight_scale`` uint8 [N, K/32] holding ``127 + log2(scale)``, no
global scale. FP8 weights in blocks (``strategy: block``, ``block_structure: [rows, cols]``)
are ``float-quantized`` with ``weight_scale`` [ceil(N/rows), K/cols].

Quantized activations are the config group's ``input_activations`` (8 bits, symmetric, int or
float, per token dynamic, or per tensor static with a float32 ``input_scale`` [1] per Linear);
the reader attaches them to the Linears it reads (:func:`llmc.core.act.attach`).

Several schemes (mixed precision) are one config group each, targeting its Linears
(:func:`group_targets`); a quantized KV cache is ``kv_cache_scheme`` with ``k_scale`` and
``v_scale`` per attention module (written by the packer, read by
:func:`llmc.formats.checkpoint.read_model`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmc.core.act import ActScheme, KVCacheScheme
from llmc.core.masks import nm_slots
from llmc.core.pack import pack_rows, unpack_rows
from llmc.core.scheme import FP4_LEVELS, MX_GROUP, QuantizedWeight, QuantScheme, SchemeKey
from llmc.formats.io import StatelessWriter
from llmc.models.moe import to_checkpoint_name
from llmc.registry import FORMATS

QUANT_METHOD = "compressed-tensors"
FORMAT_VERSION = "0.20.0"  # the package version whose packing this follows

log = logging.getLogger(__name__)


def _pack_k(codes: Tensor, bits: int) -> Tensor:
    """[R, C] codes -> [R, ceil(C*bits/32)] int32, packed along C."""
    return pack_rows(codes.t().to(torch.int32), bits).t().contiguous()


def _unpack_k(packed: Tensor, bits: int, cols: int) -> Tensor:
    return unpack_rows(packed.t().contiguous(), bits, cols).t().contiguous()


def ct_format(weight_type: str, bits: int, act: ActScheme | None, group_size: int = 16) -> str:
    """The compressed-tensors format of a scheme: ``float-quantized`` for FP8 weights,
    ``nvfp4-``/``mxfp4-pack-quantized`` for E2M1 weights in groups of 16/32, ``int-quantized``
    for 8-bit integer weights with quantized activations, else ``pack-quantized``."""
    if weight_type == "float" and bits == 4:
        return "mxfp4-pack-quantized" if group_size == MX_GROUP else "nvfp4-pack-quantized"
    if weight_type == "float":
        return "float-quantized"
    if act is not None and bits == 8:
        return "int-quantized"
    return "pack-quantized"


def ct_tensors(prefix: str, qw: QuantizedWeight, bias: Tensor | None,
               act: ActScheme | None = None) -> dict[str, Tensor]:
    """Checkpoint tensors of one quantized Linear (see the module docstring)."""
    N, K = qw.shape
    if qw.group_size != -1 and K % qw.group_size:
        raise ValueError(
            f"{prefix}: group_size {qw.group_size} does not divide in_features {K}; the "
            "compressed-tensors package needs whole groups. Use a group size that divides every "
            "layer's input width, or --format gptq"
        )
    fmt = ct_format(qw.type, qw.bits, act, qw.group_size)
    if fmt in FP4_FORMATS:
        return fp4_tensors(prefix, qw, bias)
    if fmt != "pack-quantized":
        if not qw.sym:
            raise ValueError(f"{prefix}: {fmt} weights are symmetric; use sym: true")
        weight = qw.q if qw.type == "float" else (qw.q.to(torch.int16) - 128).to(torch.int8)
        scales = qw.scales.float()
        if qw.block_rows:  # one scale per block of rows: the first row's
            scales = scales[::qw.block_rows]
            if not torch.equal(scales.repeat_interleave(qw.block_rows, dim=0)[:N],
                               qw.scales.float()):
                raise ValueError(f"{prefix}: FP8 block scales differ within a block")
        out = {f"{prefix}.weight": weight.contiguous(),
               f"{prefix}.weight_scale": scales.contiguous()}
        if bias is not None:
            out[f"{prefix}.bias"] = bias.detach().contiguous()
        return out
    out = {
        f"{prefix}.weight_packed": _pack_k(qw.q, qw.bits),
        f"{prefix}.weight_scale": qw.scales.to(torch.float16).contiguous(),
        f"{prefix}.weight_shape": torch.tensor([N, K], dtype=torch.int64),
    }
    if not qw.sym:
        out[f"{prefix}.weight_zero_point"] = pack_rows(qw.zeros.to(torch.int32), qw.bits)
    if bias is not None:
        out[f"{prefix}.bias"] = bias.detach().contiguous()
    return out


def fp4_tensors(prefix: str, qw: QuantizedWeight, bias: Tensor | None) -> dict[str, Tensor]:
    """``nvfp4-pack-quantized`` (or, groups of 32, ``mxfp4-pack-quantized``) tensors of one
    Linear (see the module docstring)."""
    N, K = qw.shape
    v = qw.q.float()
    idx = torch.full(v.shape, -1, dtype=torch.uint8)
    for i, level in enumerate(FP4_LEVELS.tolist()):
        idx[v.abs() == level] = i
    if (idx == 255).any():
        raise ValueError(f"{prefix}: codes off the E2M1 grid")
    code = idx | (torch.signbit(v) & (v != 0)).to(torch.uint8) << 3
    out = {f"{prefix}.weight_packed": (code[:, 0::2] | code[:, 1::2] << 4).contiguous()}
    if qw.group_size == MX_GROUP:  # E8M0 scales: the biased exponent
        e = torch.log2(qw.scales.float())
        if not torch.equal(e, e.round()) or e.min() < -127 or e.max() > 127:
            raise ValueError(f"{prefix}: MXFP4 scales are not powers of two")
        out[f"{prefix}.weight_scale"] = (e + 127).to(torch.uint8).contiguous()
    else:
        g = torch.tensor([qw.global_scale], dtype=torch.float32)
        s8 = (qw.scales.float() * g).to(torch.float8_e4m3fn)
        if not torch.equal(s8.float() / g, qw.scales.float()):
            raise ValueError(f"{prefix}: NVFP4 scales are not E4M3 numbers over the global "
                             "scale")
        out[f"{prefix}.weight_scale"] = s8.contiguous()
        out[f"{prefix}.weight_global_scale"] = g
    if bias is not None:
        out[f"{prefix}.bias"] = bias.detach().contiguous()
    return out


def read_fp4_tensors(tensors: dict[str, Tensor], prefix: str, scheme: QuantScheme
                     ) -> QuantizedWeight:
    """Inverse of :func:`fp4_tensors` (pops nothing)."""
    packed = tensors[f"{prefix}.weight_packed"]
    N = packed.shape[0]
    code = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(N, -1)
    v = FP4_LEVELS[(code & 7).long()]
    v = torch.where((code & 8) != 0, -v, v)
    if scheme.group_size == MX_GROUP:
        g = 0.0
        scales = torch.exp2(tensors[f"{prefix}.weight_scale"].float() - 127).contiguous()
    else:
        g = float(tensors[f"{prefix}.weight_global_scale"].float().reshape(-1)[0])
        gt = torch.tensor(g, dtype=torch.float32)
        scales = (tensors[f"{prefix}.weight_scale"].float() / gt).contiguous()
    return QuantizedWeight(
        q=v.to(torch.float8_e4m3fn), scales=scales, zeros=torch.zeros(scales.shape,
                                                                      dtype=torch.int32),
        g_idx=scheme.default_g_idx(v.shape[1]), bits=4, group_size=scheme.group_size, sym=True,
        type="float", global_scale=g,
    )


def read_unpacked_tensors(tensors: dict[str, Tensor], prefix: str, scheme: QuantScheme
                          ) -> QuantizedWeight:
    """Inverse of :func:`ct_tensors` for ``float-quantized`` and ``int-quantized`` (pops
    nothing)."""
    w = tensors[f"{prefix}.weight"]
    N, K = w.shape
    if scheme.is_float:
        q, zero = w.to(torch.float8_e4m3fn), 0
    else:
        q, zero = (w.to(torch.int16) + 128).to(torch.uint8), 128
    scales = tensors[f"{prefix}.weight_scale"].float()
    b = scheme.block_rows
    scales = (scales.repeat_interleave(b, dim=0)[:N] if b else scales.reshape(N, -1))
    scales = scales.contiguous()
    return QuantizedWeight(
        q=q.contiguous(), scales=scales,
        zeros=torch.full(scales.shape, zero, dtype=torch.int32),
        g_idx=scheme.default_g_idx(K), bits=scheme.bits, group_size=scheme.group_size,
        sym=True, type=scheme.type, block_rows=b,
    )


def read_ct_tensors(tensors: dict[str, Tensor], prefix: str, bits: int, group_size: int | None,
                    sym: bool) -> QuantizedWeight:
    """Inverse of :func:`ct_tensors` for ``pack-quantized`` (pops nothing)."""
    N, K = (int(v) for v in tensors[f"{prefix}.weight_shape"])
    scheme = QuantScheme(bits, group_size or -1, sym)
    G = scheme.num_groups(K)
    q = _unpack_k(tensors[f"{prefix}.weight_packed"], bits, K)
    if sym:
        zeros = torch.full((N, G), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = unpack_rows(tensors[f"{prefix}.weight_zero_point"], bits, N)
    g_idx = tensors.get(f"{prefix}.weight_g_idx")
    return QuantizedWeight(
        q=q.to(torch.uint8), scales=tensors[f"{prefix}.weight_scale"].float().contiguous(),
        zeros=zeros.to(torch.int32).contiguous(),
        g_idx=(scheme.default_g_idx(K) if g_idx is None else g_idx.to(torch.int32)),
        bits=bits, group_size=scheme.group_size, sym=sym,
    )


def bitmask_tensors(prefix: str, weight: Tensor) -> dict[str, Tensor]:
    """``sparse-24-bitmask`` tensors of a 2:4 weight [N, K]: exactly two kept entries per
    group of 4 (the non-zeros first, then zeros, in column order)."""
    N, K = weight.shape
    try:
        pos = nm_slots(weight.detach(), 2, 4)
    except ValueError as e:
        raise ValueError(f"{prefix}: {e}") from None
    keep = torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(-1, pos, True).reshape(N, K)
    bitmask = torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    return {
        f"{prefix}.weight.compressed": weight.detach()[keep].reshape(N, K // 2).contiguous(),
        f"{prefix}.weight.bitmask": bitmask,
        f"{prefix}.weight.shape": torch.tensor([N, K], dtype=torch.int64),
    }


def read_bitmask_tensors(tensors: dict[str, Tensor], prefix: str) -> Tensor:
    """The dense weight of :func:`bitmask_tensors`."""
    N, K = (int(v) for v in tensors[f"{prefix}.weight.shape"])
    bits = np.unpackbits(tensors[f"{prefix}.weight.bitmask"].numpy(), axis=-1, count=K,
                         bitorder="little")
    keep = torch.from_numpy(bits.astype(bool)).reshape(N, K)
    values = tensors[f"{prefix}.weight.compressed"]
    dense = torch.zeros(N, K, dtype=values.dtype)
    dense[keep] = values.reshape(-1)
    return dense


def _weights_args(bits: int, group_size: int, sym: bool, act_order: str,
                  weight_type: str = "int", block_rows: int = 0) -> dict[str, Any]:
    fp4 = weight_type == "float" and bits == 4
    mx = fp4 and group_size == MX_GROUP
    strategy = ("block" if block_rows else "tensor_group" if fp4 and not mx
                else "channel" if group_size == -1 else "group")
    return {
        "num_bits": bits, "type": weight_type, "symmetric": sym, "strategy": strategy,
        **({"scale_dtype": "torch.uint8" if mx else "torch.float8_e4m3fn"} if fp4 else {}),
        "group_size": None if group_size == -1 or block_rows else group_size,
        "actorder": "weight" if act_order == "static" and not block_rows else None,
        "dynamic": False, "observer": "minmax", "observer_kwargs": {},
        "block_structure": [block_rows, group_size] if block_rows else None,
    }


def sparsity_config(fmt: str, sparsity: float, ignore: list[str]) -> dict[str, Any]:
    return {"format": fmt, "global_sparsity": sparsity, "sparsity_structure": "2:4",
            "targets": ["Linear"], "ignore": ignore, "registry_requires_subclass": False}


def group_targets(names: list[str], others: list[str]) -> list[str]:
    """compressed-tensors ``targets`` for the Linears ``names`` of one config group, where
    ``others`` are the quantized Linears of the other groups: one ``re:`` pattern per name
    within a block (``self_attn.q_proj``) when that name is in this group in every block,
    the full names of the rest."""
    def rel(n: str) -> str:
        parts = n.split(".")
        i = next((k for k, p in enumerate(parts) if p.isdigit()), None)
        return n if i is None else ".".join(parts[i + 1:])

    theirs = {rel(n) for n in others}
    mine = sorted({rel(n) for n in names} - theirs)
    targets = [f"re:.*\\.{re.escape(r)}$" for r in mine if r != ""]
    covered = set(mine)
    return targets + [n for n in names if rel(n) not in covered]


def ct_quantization_config(
    groups: list[tuple[SchemeKey, list[str]]],
    act_order: str, ignore: list[str], sparsity: dict[str, Any] | None,
    kv_cache: KVCacheScheme | None = None,
) -> dict[str, Any]:
    """``quantization_config`` for ``config.json``: a config group per scheme and its Linears
    (one: targeting ``Linear``; several: their Linears, see :func:`group_targets`), each with
    its format (:func:`ct_format`) and
    its inputs' quantization; the Linears left out in ``ignore``; the KV cache's scheme; the
    sparsity config when 2:4. The top-level format is the groups' one, or ``mixed-precision``."""
    config_groups = {}
    formats = []
    for i, (k, names) in enumerate(groups):
        fmt = ct_format(k.type, k.bits, k.act, k.group_size)
        formats.append(fmt)
        others = [n for j, (_, their) in enumerate(groups) if j != i for n in their]
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(groups) == 1 else group_targets(names, others),
            "weights": _weights_args(k.bits, k.group_size, k.sym, act_order, k.type,
                                     k.block_rows),
            "input_activations": None if k.act is None else k.act.to_ct(),
            "output_activations": None, "format": fmt,
        }
    fmt = ("dense" if not formats else formats[0] if len(set(formats)) == 1
           else "mixed-precision")
    return {
        "quant_method": QUANT_METHOD, "version": FORMAT_VERSION,
        "format": fmt,
        "quantization_status": "compressed", "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None if kv_cache is None else kv_cache.to_ct(),
        "global_compression_ratio": None,
        "sparsity_config": sparsity or {}, "transform_config": {},
    }


FP4_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")
READABLE = ("pack-quantized", "int-quantized", "float-quantized", *FP4_FORMATS)


CTGroup = tuple[str, QuantScheme, "ActScheme | None"]  # (format, weights, activations)


def _group(g: dict[str, Any], qconfig: dict[str, Any]) -> CTGroup:
    w = g.get("weights") or {}
    fmt = g.get("format") or qconfig.get("format")
    if fmt not in READABLE:
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported; llmc reads "
                         f"{', '.join(READABLE)}")
    if w.get("strategy") not in (None, "channel", "group", "tensor_group", "block"):
        raise ValueError(f"compressed-tensors weight strategy {w.get('strategy')!r} is not "
                         "supported; llmc reads channel, group, tensor_group and block")
    rows, cols = w.get("block_structure") or (0, None)
    scheme = QuantScheme(w["num_bits"], cols or w.get("group_size") or -1,
                         bool(w.get("symmetric", True)), w.get("type", "int"),
                         block_rows=int(rows))
    acts = g.get("input_activations")
    return fmt, scheme, ActScheme.from_ct(acts) if acts else None


def ct_groups(qconfig: dict[str, Any]) -> list[tuple[list[str], CTGroup]]:
    """(targets, (format, weight scheme, activation scheme)) of each config group; refuses
    what llmc cannot read (other formats and strategies)."""
    return [(list(g.get("targets") or ["Linear"]), _group(g, qconfig))
            for g in (qconfig.get("config_groups") or {}).values()]


def group_of(groups: list[tuple[list[str], CTGroup]], name: str) -> CTGroup | None:
    """The config group a Linear ``name`` belongs to, by the package's precedence: its exact
    name, then a ``re:`` pattern, then the class name ``Linear``."""
    for test in (lambda t: t == name,
                 lambda t: t.startswith("re:") and re.match(t[3:], name) is not None,
                 lambda t: t == "Linear"):
        for targets, group in groups:
            if any(test(t) for t in targets):
                return group
    return None


CT_DYNAMIC = ("{where}dynamic act-order needs a g_idx, which compressed-tensors no longer loads "
              "(0.20 dropped actorder 'group'); use static act-order, or --format gptq")


class CTWriter(StatelessWriter):
    """One compressed-tensors checkpoint being written (pack-quantized; unquantized 2:4
    Linears as bitmasks when nothing is quantized)."""

    def pack(self, name: str, qw: QuantizedWeight, bias: Tensor | None,
             act: ActScheme | None = None, act_scale: Tensor | None = None
             ) -> dict[str, Tensor]:
        if not is_trivial_g_idx(qw.g_idx, qw.group_size):
            raise ValueError(CT_DYNAMIC.format(where=f"{name}: "))
        out = ct_tensors(name, qw, bias, act)
        if act is not None and act.dynamic is not True:
            if act_scale is None:
                raise ValueError(f"{name}: its static activation scale was never calibrated")
            key = "input_global_scale" if act.is_nvfp4 else "input_scale"
            out[f"{name}.{key}"] = act_scale.detach().float().reshape(1).cpu()
        return out

    def quantization_config(self, p: Any) -> dict[str, Any] | None:
        quantized = set(p.quantized)
        s = p.sparse24
        sp = None
        if s["names"]:
            names = set(s["names"])
            sp = sparsity_config("dense" if quantized else "sparse-24-bitmask",
                                 round(s["zeros"] / s["total"], 6),
                                 [n for n in p.linears if n not in names])
        if not quantized and sp is None and p.kv_cache is None:
            return None
        groups = [(key, [to_checkpoint_name(n, p.renames) for n in names])  # checkpoint names
                  for key, names in p.schemes.items()]
        return ct_quantization_config(groups, p.act(),
                                      [n for n in p.linears if n not in quantized], sp,
                                      p.kv_cache)


def is_trivial_g_idx(g_idx: Tensor, group_size: int) -> bool:
    """Whether ``g_idx`` is the plain column -> group map (no act-order regrouping)."""
    K = g_idx.numel()
    width = group_size if group_size != -1 else K
    return torch.equal(g_idx.long().cpu(), torch.arange(K) // width)


class CTLayout:
    """compressed-tensors (``pack-quantized``, ``sparse-24-bitmask``), as vLLM and
    transformers load it."""

    name = "compressed-tensors"
    divisible_groups = True
    bitmasks = True
    activations = True  # FP8 weights and quantized activations too
    mixed = True  # several schemes, one config group each

    def check_writable(self, recipe: Any) -> None:
        for i, step in enumerate(recipe.steps):
            if getattr(step.config, "act_order", None) == "dynamic":
                raise ValueError(CT_DYNAMIC.format(where=f"steps[{i}].args.act_order: "))
            c = step.config
            if getattr(c, "act_bits", 16) == 8 and c.bits == 8 and c.type == "int" and not c.sym:
                raise ValueError(f"steps[{i}].args.sym: int-quantized (W8A8) weights are "
                                 "symmetric; use sym: true")

    def check_readable(self, path: Any, qconfig: dict[str, Any]) -> None:
        pass

    def act_scheme(self, qconfig: dict[str, Any], name: str) -> ActScheme | None:
        """How the quantized Linear ``name`` quantizes its inputs (None: it does not)."""
        group = group_of(ct_groups(qconfig), name)
        return group[2] if group is not None else None

    def writer(self) -> CTWriter:
        return CTWriter()

    def read(self, path: Any, qconfig: dict[str, Any], tensors: dict[str, Tensor],
             shapes: dict[str, tuple[int, int]], config_name: Any = None):
        """2:4 bitmasks become dense weights in place; quantized weights are yielded, each
        read in the format of its config group (``config_name``: a Linear's name as the
        config spells it, when the checkpoint renames the model's)."""
        groups = ct_groups(qconfig)
        config_name = config_name or (lambda n: n)
        for prefix in sorted(k[: -len(".weight.compressed")] for k in tensors
                             if k.endswith(".weight.compressed")):
            tensors[f"{prefix}.weight"] = read_bitmask_tensors(tensors, prefix)
            for suffix in ("compressed", "bitmask", "shape"):
                del tensors[f"{prefix}.weight.{suffix}"]
        quantized = {k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")}
        for prefix in sorted(quantized):
            group = group_of(groups, config_name(prefix))
            if group is None:
                raise ValueError(f"{path}: {prefix} holds quantized weights but no config group "
                                 "targets it")
            fmt, scheme, _ = group
            if fmt in FP4_FORMATS:
                qw = read_fp4_tensors(tensors, prefix, scheme)
                suffixes = ("weight_packed", "weight_scale", "weight_global_scale")
            elif fmt == "pack-quantized":
                qw = read_ct_tensors(tensors, prefix, scheme.bits,
                                     None if scheme.group_size == -1 else scheme.group_size,
                                     scheme.sym)
                suffixes = tuple(f"weight_{s}" for s in ("packed", "scale", "zero_point",
                                                         "g_idx", "shape"))
            else:
                qw = read_unpacked_tensors(tensors, prefix, scheme)
                suffixes = ("weight", "weight_scale")
            for suffix in suffixes:
                tensors.pop(f"{prefix}.{suffix}", None)
            yield prefix, qw, tensors.pop(f"{prefix}.bias", None)


FORMATS.register("compressed-tensors", object, CTLayout(),
                 "compressed-tensors pack-quantized / sparse-24-bitmask")
