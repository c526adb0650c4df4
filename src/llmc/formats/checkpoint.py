"""Whole-model checkpoints: write a compressed model (the GPTQ, AWQ or compressed-tensors layout
when it holds quantized Linears, plain safetensors otherwise; compressed-tensors also stores
unquantized 2:4 weights as bitmasks) and read it back."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmc.core import act as act_quant
from llmc.formats.io import (
    beyond_weight_only,
    read_checkpoint_tensors,
    save_json,
    save_sharded_safetensors,
)
from llmc.formats.packer import SPARSITY_KEY, Packer
from llmc.models.moe import (
    checkpoint_renames,
    from_checkpoint_name,
    to_checkpoint_name,
    unfuse_experts,
)
from llmc.registry import FORMATS

log = logging.getLogger(__name__)


def recipe_act_order(recipe: Any) -> str:
    """The GPTQ column order of the last recipe step that sets one ("none" when none does)."""
    orders = [getattr(s.config, "act_order", None) for s in getattr(recipe, "steps", ())]
    orders = [o for o in orders if o is not None]
    return orders[-1] if orders else "none"


def default_format(recipe: Any) -> str:
    """``compressed-tensors`` for a recipe with FP8 weights, quantized activations, a
    quantized KV cache or several schemes (mixed precision), ``awq`` for one whose
    quantization follows an ``awq`` step at 4 bits, else ``gptq``."""
    steps = list(getattr(recipe, "steps", ()))
    schemes = {c for s in steps if (c := getattr(s.config, "scheme", None)) is not None}
    if getattr(recipe, "kv_cache", None) is not None or len(schemes) > 1 or any(
            beyond_weight_only(s.config) for s in steps):
        return "compressed-tensors"
    if steps and steps[0].method == "awq" and steps[0].config.bits == 4:
        return "awq"
    return "gptq"


def check_writable(recipe: Any, fmt: str) -> None:
    """Refuse, before any work, a recipe whose result a ``fmt`` checkpoint cannot hold."""
    FORMATS.get(fmt).impl.check_writable(recipe)


def recipe_quantizes(recipe: Any) -> bool:
    """Whether a recipe quantizes any Linear (every step targets at least one)."""
    return any(getattr(s.config, "scheme", None) is not None for s in getattr(recipe, "steps", ()))


def model_packer(model: nn.Module, fmt: str) -> Packer:
    """The :class:`~llmc.formats.packer.Packer` of a resident compressed ``model``."""
    from llmc.models import get_adapter, stored_dtype

    adapter = get_adapter(model.config)
    block_lin = [f"{adapter.blocks}.{b}.{n}" for b, blk in enumerate(adapter.get_blocks(model))
                 for n, m in blk.named_modules() if isinstance(m, nn.Linear)]
    return Packer(
        fmt, model.config,
        linears=[n for n, m in model.named_modules() if isinstance(m, nn.Linear)],
        block_linears=block_lin, groups=adapter.groups, blocks_prefix=adapter.blocks + ".",
        quantizing=any(getattr(m, "llmc_quant", None) is not None for m in model.modules()),
        act_order=recipe_act_order(getattr(model, "llmc_recipe", None)),
        save_dtype=stored_dtype(getattr(model.config, "dtype", None)),
        model_class=type(model).__name__,
        sparsity=getattr(model.config, SPARSITY_KEY, None),
    )


def block_piece(block: nn.Module, prefix: str) -> tuple[dict[str, nn.Module], dict[str, Tensor]]:
    """(modules, state) of one block under its full name ``prefix`` (no trailing dot)."""
    modules = {f"{prefix}.{n}" if n else prefix: m for n, m in block.named_modules()}
    state = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
    return modules, state


def write_model(
    model: nn.Module, out_dir: Path, max_shard_bytes: int = 2_000_000_000, fmt: str = "gptq",
    progress: bool = False,
) -> None:
    """Write ``model``'s tensors and ``config.json`` into ``out_dir`` (an empty directory): the
    ``fmt`` layout when it holds quantized Linears (or, for compressed-tensors, 2:4 weights),
    dense safetensors otherwise; packed block by block as the streaming writer packs them
    (``progress``: a bar over the blocks)."""
    from tqdm.auto import tqdm

    from llmc.models import get_adapter

    packer = model_packer(model, fmt)
    adapter = get_adapter(model.config)
    tensors: dict[str, Tensor] = {}
    in_blocks: set[str] = set()
    blocks = adapter.get_blocks(model)
    for b, block in enumerate(tqdm(blocks, desc="Packing blocks", unit="block",
                                   disable=not progress)):
        modules, state = block_piece(block, f"{adapter.blocks}.{b}")
        tensors.update(packer.pack(modules, state))
        in_blocks |= set(state)
    rest = {k: v for k, v in model.state_dict().items() if k not in in_blocks}
    outside = {n: m for n, m in model.named_modules() if not n.startswith(adapter.blocks + ".")}
    tensors.update(packer.pack(outside, rest))
    if packer.v1_linears():
        tensors = packer.rewrite(tensors, packer.v1_linears())
    config = packer.finish()
    save_sharded_safetensors(out_dir, tensors, max_shard_bytes)
    save_json(out_dir / "config.json", config)


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


def read_model(path: Path, packed: bool = False, progress: bool = False) -> nn.Module:
    """Build the model from ``config.json`` and fill it from the safetensors files.

    Quantized Linears are dequantized on CPU and keep their qparams in ``.llmc_quant``; with
    ``packed``, they become :class:`llmc.nn.QuantLinear` modules holding the packed codes (fp16
    scales), or :class:`llmc.nn.W8A8Linear` for FP8 / INT8 W8A8, built on the meta device so
    that no dense weight is ever materialised. ``progress``: a bar over the quantized
    Linears."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    qconfig = config.pop("quantization_config", None) or {}
    method = qconfig.get("quant_method")
    if qconfig and method not in FORMATS:
        raise ValueError(f"{path}: quant_method {method!r} is not supported; llmc reads "
                         f"{', '.join(FORMATS.names())}")
    layout = FORMATS.get(method).impl if qconfig else None
    if layout is not None:
        layout.check_readable(path, qconfig)
    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **config)
    if packed:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    unfuse_experts(model, model_type)  # MoE checkpoints hold one set of Linears per expert
    renames = checkpoint_renames(model_type)
    tensors = {from_checkpoint_name(k, renames): v
               for k, v in read_checkpoint_tensors(path).items()}
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, nn.Linear)}
    quantized = set()
    _read_kv_scales(model, qconfig, tensors)
    def config_name(n: str) -> str:
        return to_checkpoint_name(n, renames)

    reading = layout.read(path, qconfig, tensors, shapes, config_name) if layout else ()
    for prefix, qw, bias in tqdm(reading, desc="Reading quantized Linears", unit="Linear",
                                 disable=not progress or not layout):
        quantized.add(prefix)
        act = (layout.act_scheme(qconfig, config_name(prefix)) if hasattr(layout, "act_scheme")
               else None)
        if packed:
            from llmc.nn import QuantLinear, W8A8Linear

            if W8A8Linear.supports(qw, act):  # real FP8 / INT8 matmuls
                module = W8A8Linear.from_quantized(qw, bias)
            elif act is not None or qw.type != "int":
                raise ValueError(
                    f"{path}: packed=True holds integer weight-only Linears and W8A8 ones (8-bit "
                    "weights per channel, inputs per token); load this checkpoint (its "
                    f"{prefix}: {qw.type} {qw.bits}-bit weights, activations {act}) with "
                    "packed=False")
            else:
                module = QuantLinear.from_quantized(qw, bias)
            parent, _, child = prefix.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
            continue
        module = model.get_submodule(prefix)
        module.weight.data = qw.dequantize()
        module.llmc_quant = qw.state()
        if act is not None:  # a static scheme's calibrated scale is the checkpoint's
            scale = tensors.pop(f"{prefix}.input_scale", None)
            glob = tensors.pop(f"{prefix}.input_global_scale", None)
            act_quant.attach(module, act, glob if act.is_nvfp4 else scale)
        if bias is not None:
            module.bias.data = bias.float()
    missing, unexpected = model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=False,
        assign=packed,
    )
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in quantized]
    if getattr(hf_config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if packed:
        _materialise_buffers(model)
    model.eval()
    return model


def _read_kv_scales(model: nn.Module, qconfig: dict[str, Any], tensors: dict[str, Tensor]
                    ) -> None:
    """A checkpoint with ``kv_cache_scheme``: its ``{attention}.k_scale`` / ``v_scale`` go to the
    attention modules, whose keys and values are quantized on them from now on."""
    args = qconfig.get("kv_cache_scheme")
    if not args:
        return
    from llmc.core.act import KVCacheScheme
    from llmc.models import kvcache

    scheme = KVCacheScheme.from_ct(args)
    modules = kvcache.attention_modules(model)
    for name, m in modules.items():
        k, v = (tensors.pop(f"{name}.{s}", None) for s in kvcache.SCALE_NAMES)
        if k is None or v is None:
            raise ValueError(f"kv_cache_scheme is set but {name} has no k_scale/v_scale")
        kvcache.set_scales(m, scheme, k, v)
    kvcache.enable(model)


def _materialise_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) stay on the meta device after a meta build:
    their modules are rebuilt on the CPU from their config, and the buffers copied over."""
    for name, module in model.named_modules():
        meta = [b for b, buf in module.named_buffers(recurse=False)
                if buf is not None and buf.is_meta]
        if not meta:
            continue
        try:
            with torch.device("cpu"):
                fresh = type(module)(module.config)
        except (AttributeError, TypeError) as e:
            raise ValueError(f"{name}: cannot rebuild its buffers {meta} ({e})") from None
        for b in meta:
            module.register_buffer(b, getattr(fresh, b), persistent=False)
