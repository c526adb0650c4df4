"""The AWQ GEMM checkpoint (AutoAWQ layout, ``quant_method: awq``, ``version: gemm``), writer and
reader. 4-bit only: transformers' AWQ integration and vLLM load nothing else.

Per quantized Linear ``{prefix}`` with weight [N, K] (out, in), group size ``g``, ``G = K / g``:

    qweight  int32   [K, N/8]  codes transposed to [K, N], packed along N, 8 per word
    qzeros   int32   [G, N/8]  zero points (stored as they are), packed the same way
    scales   float16 [G, N]
    bias     [N], the Linear's dtype      when the Linear has one

Within a word, the 8 output channels ``8j .. 8j+7`` sit in the interleaved order
``[0, 2, 4, 6, 1, 3, 5, 7]``: nibble ``i`` (bits ``4i .. 4i+3``) holds channel ``8j + order[i]``.
There is no ``g_idx``: columns are grouped in their original order (``k // g``), so dynamic
act-order cannot be written; ``g`` must divide every ``K`` (the engines allocate ``K // g``
groups). Symmetric schemes are written with their zero point ``2^(bits-1)`` explicit and
``zero_point: true``: the kernels compute ``(q - z) * s`` either way.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from llmc.core.pack import to_int32
from llmc.core.scheme import QuantizedWeight
from llmc.formats.io import StatelessWriter
from llmc.registry import FORMATS

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
BITS = 4
PACK = 32 // BITS

log = logging.getLogger(__name__)


def check_awq_scheme(bits: int, group_size: int, where: str = "") -> None:
    """Refuse schemes the AWQ layout cannot hold, with what to do instead."""
    if bits != BITS:
        raise ValueError(
            f"{where}{bits}-bit weights cannot be written as an AWQ checkpoint: transformers and "
            "vLLM load 4-bit AWQ only; use --format gptq"
        )
    if group_size == -1:
        raise ValueError(
            f"{where}AWQ checkpoints need a group size (the engines have no per-channel AWQ); "
            "use a group size such as 128, or --format gptq"
        )


def _pack(codes: Tensor) -> Tensor:
    """[R, N] codes in 0..15 -> [R, N/8] int32 words in the AWQ order."""
    R, N = codes.shape
    c = codes.to(torch.int64).reshape(R, N // PACK, PACK)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(PACK, dtype=torch.int64) * BITS
    words = (c << shifts).sum(dim=-1)
    return to_int32(words)


def _unpack(words: Tensor, N: int) -> Tensor:
    """Inverse of :func:`_pack`: [R, N/8] int32 -> [R, N] codes (int64)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(PACK, dtype=torch.int64) * BITS
    nibbles = (w[:, :, None] >> shifts) & 0xF  # [R, N/8, 8] in stored order
    out = torch.empty_like(nibbles)
    out[:, :, list(AWQ_ORDER)] = nibbles
    return out.reshape(words.shape[0], N)


def awq_tensors(prefix: str, qw: QuantizedWeight, bias: Tensor | None = None) -> dict[str, Tensor]:
    """Checkpoint tensors ``{prefix}.qweight/.qzeros/.scales[/.bias]`` of one Linear."""
    N, K = qw.q.shape
    check_awq_scheme(qw.bits, qw.group_size, f"{prefix}: ")
    if K % qw.group_size:
        raise ValueError(
            f"{prefix}: group_size {qw.group_size} does not divide in_features {K}; AWQ engines "
            "allocate in_features // group_size groups. Use a group size that divides every "
            "layer's input width, or --format gptq"
        )
    if N % PACK:
        raise ValueError(f"{prefix}: out_features {N} is not a multiple of {PACK}, which AWQ "
                         "packing needs; use --format gptq")
    if not torch.equal(qw.g_idx.long(), torch.arange(K) // qw.group_size):
        raise ValueError(
            f"{prefix}: columns are not grouped in their original order (dynamic act-order); "
            "the AWQ layout has no g_idx. Quantize with act_order none or static, or use "
            "--format gptq"
        )
    scales = qw.scales.float()
    if not torch.equal(scales.half().float(), scales):
        raise ValueError(f"{prefix}: scales are not exactly representable in float16")
    out = {
        f"{prefix}.qweight": _pack(qw.q.t()),
        f"{prefix}.qzeros": _pack(qw.zeros.t()),
        f"{prefix}.scales": scales.t().to(torch.float16).contiguous(),
    }
    if bias is not None:
        out[f"{prefix}.bias"] = bias.detach().contiguous()
    return out


def read_awq_tensors(
    tensors: dict[str, Tensor], prefix: str, group_size: int, in_features: int,
    out_features: int,
) -> QuantizedWeight:
    """Inverse of :func:`awq_tensors`. ``sym`` is read off the zero points (all ``2^(bits-1)``)."""
    K, N = in_features, out_features
    qweight = tensors[f"{prefix}.qweight"]
    if qweight.shape != (K, N // PACK):
        raise ValueError(f"{prefix}.qweight has shape {tuple(qweight.shape)}, expected "
                         f"{(K, N // PACK)} for a 4-bit AWQ [{N}, {K}] weight")
    zeros = _unpack(tensors[f"{prefix}.qzeros"], N).t()
    return QuantizedWeight(
        q=_unpack(qweight, N).t().to(torch.uint8).contiguous(),
        scales=tensors[f"{prefix}.scales"].float().t().contiguous(),
        zeros=zeros.to(torch.int32).contiguous(),
        g_idx=(torch.arange(K) // group_size).to(torch.int32),
        bits=BITS,
        group_size=group_size,
        sym=bool((zeros == 2 ** (BITS - 1)).all()),
    )


def awq_quantization_config(
    group_size: int, modules_to_not_convert: list[str] | None = None
) -> dict[str, Any]:
    """The ``quantization_config`` transformers' ``AwqConfig`` and vLLM read."""
    check_awq_scheme(BITS, group_size)
    return {
        "quant_method": "awq",
        "bits": BITS,
        "group_size": group_size,
        "version": "gemm",
        "zero_point": True,
        "modules_to_not_convert": modules_to_not_convert,
    }


class AWQWriter(StatelessWriter):
    """One AWQ (GEMM) checkpoint being written."""

    def pack(self, name: str, qw: QuantizedWeight, bias: Tensor | None) -> dict[str, Tensor]:
        return awq_tensors(name, qw, bias)

    def quantization_config(self, p: Any) -> dict[str, Any] | None:
        if not p.quantized:
            return None
        quantized = set(p.quantized)
        rest = [n for n in p.block_linears if n not in quantized]
        return awq_quantization_config(p.scheme[1], rest or None)


class AWQLayout:
    """AutoAWQ's GEMM layout (4-bit, grouped), as transformers and vLLM load it."""

    name = "awq"
    divisible_groups = True
    bitmasks = False

    def check_writable(self, recipe: Any) -> None:
        FORMATS.get("gptq").impl.check_writable(recipe)
        for i, step in enumerate(recipe.steps):
            c = step.config
            if getattr(c, "scheme", None) is not None:
                check_awq_scheme(c.bits, c.group_size, f"steps[{i}].args: ")
            if getattr(c, "act_order", None) == "dynamic":
                raise ValueError(
                    f"steps[{i}].args.act_order: dynamic act-order regroups columns, which the "
                    "AWQ layout (no g_idx) cannot store; use static, or --format gptq"
                )

    def check_readable(self, path: Any, qconfig: dict[str, Any]) -> None:
        if qconfig.get("bits", qconfig.get("w_bit")) != 4 \
                or str(qconfig.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"{path}: only 4-bit AWQ in the GEMM layout can be read")

    def writer(self) -> AWQWriter:
        return AWQWriter()

    def read(self, path: Any, qconfig: dict[str, Any], tensors: dict[str, Tensor],
             shapes: dict[str, tuple[int, int]], config_name: Any = None):
        for prefix in sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")):
            N, K = shapes[prefix]
            qw = read_awq_tensors(tensors, prefix, qconfig["group_size"], K, N)
            for suffix in ("qweight", "qzeros", "scales"):
                tensors.pop(f"{prefix}.{suffix}", None)
            yield prefix, qw, tensors.pop(f"{prefix}.bias", None)


FORMATS.register("awq", object, AWQLayout(), "AutoAWQ GEMM, 4-bit")
