"""Whole-model checkpoints: write a compressed model (the GPTQ or AWQ layout when it holds
quantized Linears, plain safetensors otherwise) and read it back."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmc.formats.awq import read_awq_tensors
from llmc.formats.gptq import (
    choose_checkpoint_format,
    quantization_config,
    read_gptq_tensors,
    write_gptq_checkpoint,
)
from llmc.formats.io import (
    plain_tensors,
    read_checkpoint_tensors,
    save_json,
    save_sharded_safetensors,
)

log = logging.getLogger(__name__)


def _act_order(model: nn.Module) -> str:
    """The act_order of the recipe step that quantized the model ("none" when unknown)."""
    recipe = getattr(model, "llmc_recipe", None)
    orders = [getattr(s.config, "act_order", None) for s in getattr(recipe, "steps", ())]
    orders = [o for o in orders if o is not None]
    return orders[-1] if orders else "none"


def check_gptq_writable(recipe: Any) -> None:
    """Refuse, before any work, a recipe whose result one GPTQ checkpoint cannot hold: widths
    the engines do not load, or several (bits, group_size, sym) schemes."""
    from llmc.formats.gptq import ENGINE_BITS

    schemes = {}
    for i, step in enumerate(recipe.steps):
        c = getattr(step.config, "scheme", None)
        if c is None:
            continue
        if c.bits not in ENGINE_BITS:
            raise ValueError(
                f"steps[{i}].args.bits: {c.bits}-bit weights cannot be written as a GPTQ "
                f"checkpoint (engines load {', '.join(map(str, ENGINE_BITS))} bits)"
            )
        schemes[(c.bits, c.group_size, c.sym)] = i
    if len(schemes) > 1:
        raise ValueError(
            f"the recipe quantizes with several schemes {sorted(schemes)}; a GPTQ checkpoint "
            "holds one (bits, group_size, sym)"
        )


def _modules_in_block(model: nn.Module, quant: dict[str, nn.Module]) -> list[list[str]] | None:
    """GPTQModel's ``modules_in_block_to_quantize`` when only some block Linears are quantized
    (engines then keep the others dense); None when all are."""
    from llmc.models import block_linears, get_adapter

    adapter = get_adapter(model.config)
    prefix = adapter.blocks + "."
    rel = {n[len(prefix):].split(".", 1)[1] for n in quant if n.startswith(prefix)}
    if rel == set(block_linears(adapter.get_blocks(model)[0])):
        return None
    return [[n for n in g if n in rel] for g in adapter.groups if any(n in rel for n in g)]


SPARSITY_KEY = "llmc_sparsity"


def sparsity_record(model: nn.Module) -> dict[str, Any] | None:
    """What pruning left in the model, for ``config.json``: the structure(s), the fraction of
    zeros the masks set over the pruned Linears, their count; the zeros are stored in the
    weights (dense)."""
    pruned = [m for m in model.modules() if getattr(m, "llmc_sparsity", None)]
    if not pruned:
        return getattr(model.config, SPARSITY_KEY, None)  # read from a pruned checkpoint
    total = sum(m.weight.numel() for m in pruned)
    zeros = sum(m.llmc_sparsity["sparsity"] * m.weight.numel() for m in pruned)
    return {
        "structure": ", ".join(sorted({m.llmc_sparsity["structure"] for m in pruned})),
        "sparsity": round(zeros / total, 6),
        "pruned_layers": len(pruned),
        "storage": "dense",
    }


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop(SPARSITY_KEY, None)
    record = sparsity_record(model)
    if record is not None:
        config[SPARSITY_KEY] = record
    config["architectures"] = [type(model).__name__]
    return config


FORMATS = ("gptq", "awq")


def default_format(recipe: Any) -> str:
    """``awq`` for a recipe whose quantization follows an ``awq`` step at 4 bits, else
    ``gptq``."""
    steps = list(getattr(recipe, "steps", ()))
    if steps and steps[0].method == "awq" and steps[0].config.bits == 4:
        return "awq"
    return "gptq"


def check_writable(recipe: Any, fmt: str) -> None:
    """Refuse, before any work, a recipe whose result a ``fmt`` checkpoint cannot hold."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    check_gptq_writable(recipe)
    if fmt == "awq":
        from llmc.formats.awq import check_awq_scheme

        for i, step in enumerate(recipe.steps):
            c = step.config
            if getattr(c, "scheme", None) is not None:
                check_awq_scheme(c.bits, c.group_size, f"steps[{i}].args: ")
            if getattr(c, "act_order", None) == "dynamic":
                raise ValueError(
                    f"steps[{i}].args.act_order: dynamic act-order regroups columns, which the "
                    "AWQ layout (no g_idx) cannot store; use static, or --format gptq"
                )


def _unquantized_block_linears(model: nn.Module, quant: dict[str, nn.Module]) -> list[str] | None:
    from llmc.models import get_adapter

    adapter = get_adapter(model.config)
    names = [f"{adapter.blocks}.{b}.{n}" for b, block in enumerate(adapter.get_blocks(model))
             for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    rest = [n for n in names if n not in quant]
    return rest or None


def write_model(
    model: nn.Module, out_dir: Path, max_shard_bytes: int = 2_000_000_000, fmt: str = "gptq"
) -> None:
    """Write ``model``'s tensors and ``config.json`` into ``out_dir`` (an empty directory): the
    ``fmt`` layout (gptq or awq) when it holds quantized Linears, dense safetensors otherwise."""
    quant = {n: m for n, m in model.named_modules() if getattr(m, "llmc_quant", None) is not None}
    config = _config_dict(model)
    state = {k: v for k, v in model.state_dict().items()
             if k.rsplit(".", 1)[0] not in quant}
    if not quant:
        save_sharded_safetensors(out_dir, plain_tensors(state, config), max_shard_bytes)
        save_json(out_dir / "config.json", config)
        return
    quantized = {n: (m.llmc_quant.codes(m.weight, n), m.bias) for n, m in quant.items()}
    qws = [qw for qw, _ in quantized.values()]
    schemes = {(q.bits, q.group_size, q.sym) for q in qws}
    if len(schemes) > 1:
        raise ValueError(
            f"the model mixes quantization schemes {sorted(schemes)}; one {fmt.upper()} "
            "checkpoint holds one (bits, group_size, sym)"
        )
    bits, group_size, sym = schemes.pop()
    if fmt == "awq":
        from llmc.formats.awq import awq_quantization_config, write_awq_checkpoint

        qconfig = awq_quantization_config(group_size, _unquantized_block_linears(model, quant))
        write_awq_checkpoint(out_dir, state, quantized, config, qconfig, max_shard_bytes)
        return
    if fmt != "gptq":
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    act_order = _act_order(model)
    qconfig = quantization_config(
        bits, group_size, sym, desc_act=act_order != "none",
        static_groups=act_order == "static", checkpoint_format=choose_checkpoint_format(qws),
        modules_in_block_to_quantize=_modules_in_block(model, quant),
    )
    write_gptq_checkpoint(out_dir, state, quantized, config, qconfig, max_shard_bytes)


def quant_method(path: Path) -> str | None:
    """``quantization_config.quant_method`` of a model directory (None when unquantized)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    q = json.loads(cfg.read_text()).get("quantization_config") or {}
    return q.get("quant_method")


def is_llmc_checkpoint(path: Path) -> bool:
    """A directory :func:`read_model` can load: a GPTQ or AWQ checkpoint, or llmc's dense one."""
    return quant_method(path) in FORMATS or (path / "llmc_report.json").is_file()


def read_model(path: Path) -> nn.Module:
    """Build the model from ``config.json`` and fill it from the safetensors files; quantized
    Linears are dequantized on CPU and keep their qparams in ``.llmc_quant``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    qconfig = config.pop("quantization_config", None) or {}
    method = qconfig.get("quant_method")
    if qconfig and method not in FORMATS:
        raise ValueError(f"{path}: quant_method {method!r} is not supported")
    if method == "awq" and (qconfig.get("bits", qconfig.get("w_bit")) != 4
                            or str(qconfig.get("version", "gemm")).lower() != "gemm"):
        raise ValueError(f"{path}: only 4-bit AWQ in the GEMM layout can be read")
    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **config)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    tensors = read_checkpoint_tensors(path)
    for prefix in sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")):
        module = model.get_submodule(prefix)
        if method == "awq":
            qw = read_awq_tensors(tensors, prefix, qconfig["group_size"], module.in_features,
                                  module.out_features)
        else:
            qw = read_gptq_tensors(
                tensors, prefix, qconfig["bits"], qconfig["group_size"], qconfig["sym"],
                qconfig.get("checkpoint_format", "gptq"), module.in_features,
                module.out_features,
            )
        module.weight.data = qw.dequantize()
        module.llmc_quant = qw.state()
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            tensors.pop(f"{prefix}.{suffix}", None)
        bias = tensors.pop(f"{prefix}.bias", None)
        if bias is not None:
            module.bias.data = bias.float()
    missing, unexpected = model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=False
    )
    quantized = {n for n, m in model.named_modules() if hasattr(m, "llmc_quant")}
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in quantized]
    if getattr(hf_config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.eval()
    return model
