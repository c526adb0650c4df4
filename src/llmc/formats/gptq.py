"""The Hugging Face GPTQ checkpoint (AutoGPTQ / GPTQModel layout), writer and reader.

Per quantized Linear ``{prefix}`` with weight [N, K] (out, in), ``G`` groups:

    qweight  int32   [ceil(K*bits/32), N]  codes, transposed to [K, N] and packed along K
    qzeros   int32   [G, ceil(N*bits/32)]  zero points packed along N; minus one in "gptq" (v1)
    scales   float16 [G, N]
    g_idx    int32   [K]                   group of each input column (act order permutes it)
    bias     [N], the Linear's dtype      when the Linear has one

v1 (``checkpoint_format: "gptq"``) stores ``zero - 1``, so a zero point of 0 (asymmetric
quantization) cannot be stored; ``gptq_v2`` stores zeros as they are. Packing follows
:mod:`llmc.core.pack` (AutoGPTQ's bit layout, 3-bit included).

Engines: transformers (through gptqmodel) allocates ``ceil(K / group_size)`` groups and
loads a narrower last group; vLLM's GPTQ loader requires ``K % group_size == 0``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import Tensor

from llmc.core.pack import pack_cols, pack_rows, packed_len, unpack_cols, unpack_rows
from llmc.core.scheme import QuantizedWeight
from llmc.formats.io import (
    read_checkpoint_tensors,
    refuse_beyond_weight_only,
    write_quantized_checkpoint,
)
from llmc.registry import FORMATS

__all__ = [
    "choose_checkpoint_format",
    "gptq_tensors",
    "quantization_config",
    "ragged_groups_warning",
    "read_checkpoint_tensors",
    "read_gptq_tensors",
    "write_gptq_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
ENGINE_BITS = (2, 3, 4, 8)  # what transformers' GPTQConfig, GPTQModel kernels and vLLM accept

log = logging.getLogger(__name__)


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format: {checkpoint_format!r} is not a GPTQ layout; use one of "
            f"{CHECKPOINT_FORMATS}"
        )


def _zero_offset(checkpoint_format: str) -> int:
    return 1 if checkpoint_format == "gptq" else 0


def gptq_tensors(
    prefix: str, qw: QuantizedWeight, bias: Tensor | None = None, checkpoint_format: str = "gptq"
) -> dict[str, Tensor]:
    """Checkpoint tensors ``{prefix}.qweight/.qzeros/.scales/.g_idx[/.bias]`` of one Linear
    (shapes in the module docstring)."""
    _check_format(checkpoint_format)
    N, K = qw.q.shape
    G = qw.scales.shape[1]
    if qw.scales.shape != (N, G) or qw.zeros.shape != (N, G) or qw.g_idx.shape != (K,):
        raise ValueError(
            f"{prefix}: inconsistent shapes q {tuple(qw.q.shape)}, scales "
            f"{tuple(qw.scales.shape)}, zeros {tuple(qw.zeros.shape)}, g_idx "
            f"{tuple(qw.g_idx.shape)}; expected [N, K], [N, G], [N, G], [K]"
        )
    scales = qw.scales.float()
    if not torch.equal(scales.half().float(), scales):
        raise ValueError(
            f"{prefix}: scales are not exactly representable in float16, so the checkpoint "
            "would not match the model; round scales to fp16 before computing the codes "
            "(qparams_from_range does)"
        )
    zeros = qw.zeros.t().to(torch.int64) - _zero_offset(checkpoint_format)  # [G, N]
    if checkpoint_format == "gptq" and zeros.numel() and int(zeros.min()) < 0:
        raise ValueError(
            f"{prefix}: a zero point of 0 cannot be stored in checkpoint_format 'gptq' (v1 "
            "stores zero - 1); write 'gptq_v2' (see choose_checkpoint_format)"
        )
    out = {
        f"{prefix}.qweight": pack_rows(qw.q.t(), qw.bits),
        f"{prefix}.qzeros": pack_cols(zeros, qw.bits),
        f"{prefix}.scales": scales.t().to(torch.float16).contiguous(),
        f"{prefix}.g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        # kept at its own dtype: the round trip stays exact; engines cast on load
        out[f"{prefix}.bias"] = bias.detach().contiguous()
    return out


def read_gptq_tensors(
    tensors: dict[str, Tensor],
    prefix: str,
    bits: int,
    group_size: int,
    sym: bool,
    checkpoint_format: str,
    in_features: int,
    out_features: int,
) -> QuantizedWeight:
    """Inverse of :func:`gptq_tensors` (``G`` from the shape of ``scales``). The bias, if any,
    is ``tensors[f"{prefix}.bias"]``."""
    _check_format(checkpoint_format)
    K, N = in_features, out_features
    qweight = tensors[f"{prefix}.qweight"]
    if qweight.shape != (packed_len(K, bits), N):
        raise ValueError(
            f"{prefix}.qweight has shape {tuple(qweight.shape)}, expected "
            f"{(packed_len(K, bits), N)} for a {bits}-bit [{N}, {K}] weight"
        )
    scales = tensors[f"{prefix}.scales"]  # [G, N]
    zeros = unpack_cols(tensors[f"{prefix}.qzeros"], bits, N) + _zero_offset(checkpoint_format)
    return QuantizedWeight(
        q=unpack_rows(qweight, bits, K).t().to(torch.uint8).contiguous(),
        scales=scales.float().t().contiguous(),
        zeros=zeros.t().to(torch.int32).contiguous(),
        g_idx=tensors[f"{prefix}.g_idx"].to(torch.int32).contiguous(),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def choose_checkpoint_format(qws: Iterable[QuantizedWeight]) -> str:
    """``"gptq"`` (v1, the most widely loadable) when every zero point is >= 1, else
    ``"gptq_v2"``, since v1 stores ``zero - 1``."""
    lowest = min((int(qw.zeros.min()) for qw in qws if qw.zeros.numel()), default=1)
    if lowest >= 1:
        logger.info("writing checkpoint_format 'gptq' (v1): every zero point is >= 1")
        return "gptq"
    logger.info(
        "writing checkpoint_format 'gptq_v2': some zero points are 0, which v1 (zero - 1) "
        "cannot store; gptqmodel and recent vLLM read gptq_v2"
    )
    return "gptq_v2"


def ragged_groups_warning(name: str, in_features: int, group_size: int) -> str | None:
    """A warning when ``group_size`` does not divide ``in_features``, else None."""
    if group_size == -1 or in_features % group_size == 0:
        return None
    return (
        f"{name}: group_size {group_size} does not divide in_features {in_features} (last "
        f"group {in_features % group_size} wide); transformers + gptqmodel can load this "
        "checkpoint, vLLM cannot (its GPTQ loader requires in_features % group_size == 0)"
    )


def _llmc_version() -> str:
    try:
        return version("llmc")
    except PackageNotFoundError:
        return "unknown"


def quantization_config(
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    static_groups: bool = False,
    checkpoint_format: str = "gptq",
    *,
    damp_percent: float | None = None,
    true_sequential: bool = True,
    lm_head: bool = False,
    modules_in_block_to_quantize: list[list[str]] | None = None,
) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json``, with the fields transformers'
    ``GPTQConfig`` reads and GPTQModel writes (tuning knobs both at top level and in ``meta``)."""
    _check_format(checkpoint_format)
    if bits not in ENGINE_BITS:
        raise ValueError(
            f"bits: {bits} cannot be written as GPTQ (transformers, gptqmodel and vLLM load "
            f"{ENGINE_BITS}); quantize with one of those or export compressed-tensors"
        )
    if damp_percent is not None and not 0 < damp_percent < 1:
        raise ValueError(f"damp_percent: {damp_percent} must lie in (0, 1), e.g. 0.01")
    tuning: dict[str, Any] = {"static_groups": static_groups, "true_sequential": true_sequential}
    if damp_percent is not None:
        tuning["damp_percent"] = damp_percent
    qconfig: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "desc_act": desc_act,
        "lm_head": lm_head,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        **tuning,
        "meta": {"quantizer": [f"llmc:{_llmc_version()}"], **tuning},
    }
    if modules_in_block_to_quantize is not None:
        qconfig["modules_in_block_to_quantize"] = modules_in_block_to_quantize
    return qconfig


def _check_matches(name: str, qw: QuantizedWeight, qconfig: dict[str, Any]) -> None:
    for key in ("bits", "group_size", "sym"):
        if getattr(qw, key) != qconfig[key]:
            raise ValueError(
                f"{name}: {key}={getattr(qw, key)!r} but quantization_config says "
                f"{qconfig[key]!r}; one GPTQ checkpoint holds one scheme, so build the config "
                "from the scheme that quantized the model"
            )


def _warn_engine_limits(quantized: dict[str, tuple[QuantizedWeight, Tensor | None]]) -> None:
    """One warning per distinct problem shape, not one per layer."""
    seen: dict[str, list[str]] = {}
    for name, (qw, _) in quantized.items():
        N, K = qw.q.shape
        msg = ragged_groups_warning(f"layers with in_features {K}", K, qw.group_size)
        if msg is None and (K % 32 or N % 32):
            msg = (
                f"layers of shape [{N}, {K}]: GPTQ kernels expect in/out features that are "
                "multiples of 32; some engines may refuse this checkpoint"
            )
        if msg is not None:
            seen.setdefault(msg, []).append(name)
    for msg, names in seen.items():
        logger.warning("%s (e.g. %s, %d module(s))", msg, names[0], len(names))


def write_gptq_checkpoint(
    out_dir: str | os.PathLike[str],
    state: dict[str, Tensor],
    quantized: dict[str, tuple[QuantizedWeight, Tensor | None]],
    config_dict: dict[str, Any],
    qconfig: dict[str, Any],
    max_shard_bytes: int = 2_000_000_000,
) -> list[str]:
    """Write a GPTQ checkpoint into ``out_dir``: sharded safetensors and ``config.json``
    (``config_dict`` plus ``quantization_config = qconfig``).

    ``state``: the non-quantized tensors, named as in the HF state dict; ``quantized``: module
    name -> (codes and qparams, bias or None). Wrap in :func:`llmc.formats.io.atomic_output_dir`
    for an all-or-nothing export. Returns the file names written.
    """
    fmt = qconfig.get("checkpoint_format", "gptq")
    _warn_engine_limits(quantized)
    for name, (qw, _) in quantized.items():
        _check_matches(name, qw, qconfig)
    return write_quantized_checkpoint(
        out_dir, state, quantized, lambda name, qw, bias: gptq_tensors(name, qw, bias, fmt),
        config_dict, qconfig, max_shard_bytes,
    )


def _recipe_schemes(recipe: Any) -> dict[tuple[int, int, bool], int]:
    out = {}
    for i, step in enumerate(recipe.steps):
        c = getattr(step.config, "scheme", None)
        if c is not None:
            out[(c.bits, c.group_size, c.sym)] = i
    return out


class GPTQWriter:
    """One GPTQ checkpoint being written: v1 ``gptq`` while every zero point is >= 1 (v1
    stores zero - 1), ``gptq_v2`` once one is 0; the Linears packed as v1 before that need
    their qzeros rewritten (:meth:`v1_linears`). Engine-limit warnings are gathered and logged
    once at the end."""

    def __init__(self) -> None:
        self.gptq_format = "gptq"
        self._v1: list[str] = []
        self._warnings: dict[str, list[str]] = {}

    def pack(self, name: str, qw: QuantizedWeight, bias: Tensor | None) -> dict[str, Tensor]:
        N, K = qw.q.shape
        msg = ragged_groups_warning(f"layers with in_features {K}", K, qw.group_size)
        if msg is None and (K % 32 or N % 32):
            msg = (f"layers of shape [{N}, {K}]: GPTQ kernels expect in/out features that are "
                   "multiples of 32; some engines may refuse this checkpoint")
        if msg is not None:
            self._warnings.setdefault(msg, []).append(name)
        if self.gptq_format == "gptq" and qw.zeros.numel() and int(qw.zeros.min()) < 1:
            log.info("writing checkpoint_format 'gptq_v2': %s has a zero point of 0, which v1 "
                     "(zero - 1) cannot store; gptqmodel and recent vLLM read gptq_v2", name)
            self.gptq_format = "gptq_v2"
        if self.gptq_format == "gptq":
            self._v1.append(name)
        return gptq_tensors(name, qw, bias, self.gptq_format)

    def v1_linears(self) -> list[str]:
        return [] if self.gptq_format == "gptq" else list(self._v1)

    def quantization_config(self, p: Any) -> dict[str, Any] | None:
        if not p.quantized:
            return None
        bits, group_size, sym = p.scheme
        if bits not in ENGINE_BITS:
            raise ValueError(f"{bits}-bit weights cannot be written as a GPTQ checkpoint")
        act = p.act()
        return quantization_config(
            bits, group_size, sym, desc_act=act != "none", static_groups=act == "static",
            checkpoint_format=self.gptq_format,
            modules_in_block_to_quantize=p.modules_in_block(set(p.quantized)),
        )

    def finish(self) -> None:
        for msg, names in self._warnings.items():
            log.warning("%s (e.g. %s, %d module(s))", msg, names[0], len(names))

    def state(self) -> dict[str, Any]:
        return {"gptq_format": self.gptq_format, "v1": self._v1, "warnings": self._warnings}

    def load_state(self, state: dict[str, Any]) -> None:
        self.gptq_format = state["gptq_format"]
        self._v1 = list(state["v1"])
        self._warnings = {k: list(v) for k, v in state["warnings"].items()}


class GPTQLayout:
    """The HF GPTQ layout (qweight/qzeros/scales/g_idx), as transformers, GPTQModel and vLLM
    load it."""

    name = "gptq"
    divisible_groups = False  # engines pad a last partial group
    bitmasks = False

    def check_writable(self, recipe: Any) -> None:
        """Refuse, before any work, a recipe whose result one GPTQ checkpoint cannot hold:
        widths the engines do not load, several (bits, group_size, sym) schemes, FP8 weights
        or quantized activations."""
        refuse_beyond_weight_only(recipe, self.name)
        schemes = _recipe_schemes(recipe)
        for (bits, _, _), i in schemes.items():
            if bits not in ENGINE_BITS:
                raise ValueError(
                    f"steps[{i}].args.bits: {bits}-bit weights cannot be written as a GPTQ "
                    f"checkpoint (engines load {', '.join(map(str, ENGINE_BITS))} bits)"
                )
        if len(schemes) > 1:
            raise ValueError(
                f"the recipe quantizes with several schemes {sorted(schemes)}; a GPTQ "
                "checkpoint holds one (bits, group_size, sym): use --format "
                "compressed-tensors (a config group per scheme)"
            )

    def check_readable(self, path: Any, qconfig: dict[str, Any]) -> None:
        pass

    def writer(self) -> GPTQWriter:
        return GPTQWriter()

    def read(self, path: Any, qconfig: dict[str, Any], tensors: dict[str, Tensor],
             shapes: dict[str, tuple[int, int]], config_name: Any = None):
        """Yield ``(prefix, QuantizedWeight, bias)`` per quantized Linear, removing its
        tensors from ``tensors``."""
        for prefix in sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")):
            N, K = shapes[prefix]
            qw = read_gptq_tensors(tensors, prefix, qconfig["bits"], qconfig["group_size"],
                                   qconfig["sym"], qconfig.get("checkpoint_format", "gptq"),
                                   K, N)
            for suffix in ("qweight", "qzeros", "scales", "g_idx"):
                tensors.pop(f"{prefix}.{suffix}", None)
            yield prefix, qw, tensors.pop(f"{prefix}.bias", None)


FORMATS.register("gptq", object, GPTQLayout(), "HF GPTQ (v1, or gptq_v2 when a zero point is 0)")
