"""Whole-model checkpoints: write a compressed model (the GPTQ layout when it holds quantized
Linears, plain safetensors otherwise) and read it back."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmc.formats.gptq import (
    _plain_tensors,
    choose_checkpoint_format,
    quantization_config,
    read_gptq_tensors,
    write_gptq_checkpoint,
)
from llmc.formats.io import read_checkpoint_tensors, save_json, save_sharded_safetensors

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
        c = step.config
        if not hasattr(c, "bits"):
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


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    return config


def write_model(model: nn.Module, out_dir: Path, max_shard_bytes: int = 2_000_000_000) -> None:
    """Write ``model``'s tensors and ``config.json`` into ``out_dir`` (an empty directory)."""
    quant = {n: m for n, m in model.named_modules() if getattr(m, "llmc_quant", None) is not None}
    config = _config_dict(model)
    state = {k: v for k, v in model.state_dict().items()
             if k.rsplit(".", 1)[0] not in quant}
    if not quant:
        save_sharded_safetensors(out_dir, _plain_tensors(state, config), max_shard_bytes)
        save_json(out_dir / "config.json", config)
        return
    quantized = {n: (m.llmc_quant.codes(m.weight, n), m.bias) for n, m in quant.items()}
    qws = [qw for qw, _ in quantized.values()]
    schemes = {(q.bits, q.group_size, q.sym) for q in qws}
    if len(schemes) > 1:
        raise ValueError(
            f"the model mixes quantization schemes {sorted(schemes)}; one GPTQ checkpoint holds "
            "one (bits, group_size, sym)"
        )
    bits, group_size, sym = schemes.pop()
    act_order = _act_order(model)
    qconfig = quantization_config(
        bits, group_size, sym, desc_act=act_order != "none",
        static_groups=act_order == "static", checkpoint_format=choose_checkpoint_format(qws),
        modules_in_block_to_quantize=_modules_in_block(model, quant),
    )
    write_gptq_checkpoint(out_dir, state, quantized, config, qconfig, max_shard_bytes)


def is_gptq_checkpoint(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    q = json.loads(cfg.read_text()).get("quantization_config") or {}
    return q.get("quant_method") == "gptq"


def is_llmc_checkpoint(path: Path) -> bool:
    """A directory written by llmc (GPTQ or dense) that :func:`read_model` can load."""
    return is_gptq_checkpoint(path) or (path / "llmc_report.json").is_file()


def read_model(path: Path) -> nn.Module:
    """Build the model from ``config.json`` and fill it from the safetensors files; quantized
    Linears are dequantized on CPU and keep their qparams in ``.llmc_quant``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    qconfig = config.pop("quantization_config", None) or {}
    if qconfig and qconfig.get("quant_method") != "gptq":
        raise ValueError(f"{path}: quant_method {qconfig.get('quant_method')!r} is not supported")
    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **config)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    tensors = read_checkpoint_tensors(path)
    for prefix in sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")):
        module = model.get_submodule(prefix)
        qw = read_gptq_tensors(
            tensors, prefix, qconfig["bits"], qconfig["group_size"], qconfig["sym"],
            qconfig.get("checkpoint_format", "gptq"), module.in_features, module.out_features,
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
