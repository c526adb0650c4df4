"""One checkpoint layout, packed a piece at a time: :class:`Packer` turns the tensors of a
compressed block (or of the rest of the model) into the tensors of the chosen layout the moment
the block is done, remembering what ``config.json`` will need (schemes, act order, which Linears
were quantized, sparsity), and :meth:`Packer.finish` gives that config at the end.

The streaming writer packs block by block as the walk goes; :func:`llmc.save` packs a resident
model the same way, so both give the same tensors. Layouts:

- ``gptq``: quantized Linears as qweight/qzeros/scales/g_idx. ``checkpoint_format`` is v1
  ``gptq`` while every zero point is >= 1 (v1 stores zero - 1) and ``gptq_v2`` once one is 0:
  Linears packed as v1 before that must then have their qzeros rewritten
  (:meth:`Packer.v1_linears`, :func:`qzeros_to_v2`).
- ``awq``: the AutoAWQ GEMM layout.
- ``compressed-tensors``: pack-quantized; unquantized 2:4 Linears as bitmasks when the recipe
  quantizes nothing.
- no quantized Linear anywhere: plain safetensors.

Unquantized floating tensors are written in ``save_dtype``, the dtype the source checkpoint
stored them in.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import Tensor, nn

from llmc.core.act import ActScheme, KVCacheScheme
from llmc.core.masks import is_nm
from llmc.core.pack import pack_cols, unpack_cols
from llmc.core.scheme import QuantizedWeight, SchemeKey
from llmc.formats.compressed_tensors import bitmask_tensors, is_trivial_g_idx
from llmc.models.kvcache import SCALE_NAMES
from llmc.models.moe import checkpoint_renames, rename_tree, to_checkpoint_name
from llmc.registry import FORMATS

log = logging.getLogger(__name__)

SPARSITY_KEY = "llmc_sparsity"


def qzeros_to_v2(tensors: dict[str, Tensor], names: list[str], bits: int) -> dict[str, Tensor]:
    """``tensors`` with the GPTQ v1 ``qzeros`` (zero - 1) of the Linears ``names`` rewritten
    as v2 (zero)."""
    out = dict(tensors)
    for name in names:
        key = f"{name}.qzeros"
        if key in tensors:
            N = tensors[f"{name}.scales"].shape[1]
            out[key] = pack_cols(unpack_cols(tensors[key], bits, N) + 1, bits)
    return out


class Packer:
    """Packs the pieces of one model into the ``fmt`` layout.

    ``config``: the model's HF config; ``linears``: the names of every Linear of the model
    (head included) and ``block_linears`` those inside the blocks (in order); ``quantizing``:
    whether any Linear will be quantized (known from the recipe before the first block);
    ``act_order``: the recipe's GPTQ column order ("none" when unknown); ``save_dtype``: the
    dtype of unquantized floating tensors; ``model_class``: the ``architectures`` entry."""

    def __init__(self, fmt: str, config: Any, linears: list[str], block_linears: list[str],
                 groups: tuple[tuple[str, ...], ...], blocks_prefix: str, quantizing: bool,
                 act_order: str = "none", save_dtype: torch.dtype = torch.float32,
                 model_class: str | None = None, sparsity: dict[str, Any] | None = None) -> None:
        self.layout = FORMATS.get(fmt).impl  # refuses an unknown name with the valid ones
        self.writer = self.layout.writer()
        self.fmt = fmt
        self.config = config
        self.linears = linears
        self.block_linears = block_linears
        self.groups = groups
        self.blocks_prefix = blocks_prefix
        self.quantizing = quantizing
        self.act_order = act_order
        self.save_dtype = save_dtype
        self.model_class = model_class
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        # MoE layers renamed by transformers (Mixtral's block_sparse_moe): the checkpoint keeps
        # the original names, which engines' loaders read
        self.renames = checkpoint_renames(getattr(config, "model_type", None))
        self.scheme: tuple[int, int, bool] | None = None  # the first quantized Linear's
        self.weight_type = "int"  # or "float" (FP8)
        self.activations: ActScheme | None = None  # the inputs' quantization (first Linear)
        # every scheme -> the Linears it quantized; a layout with ``mixed`` holds several (one
        # config group each)
        self.schemes: dict[SchemeKey, list[str]] = {}
        self.kv_cache: KVCacheScheme | None = None  # the KV cache's scheme, once a block has one
        self.quantized: list[str] = []
        self.dynamic = False
        self._pruned = {"structures": set(), "zeros": 0.0, "total": 0, "count": 0}
        self._sparse24 = {"names": [], "zeros": 0, "total": 0}
        self._loaded_sparsity = sparsity  # a pruned checkpoint read back, whose layers are unmarked

    # -- per piece ----------------------------------------------------------------------------
    def pack(self, modules: dict[str, nn.Module], state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The checkpoint tensors of one piece: ``modules`` (full name -> module) and their
        ``state`` (full tensor name -> tensor)."""
        quant = {n: m for n, m in modules.items() if getattr(m, "llmc_quant", None) is not None}
        for m in modules.values():
            if getattr(m, "llmc_sparsity", None):
                self._note_pruned(m)
        sparse = self._sparse24_of(modules) if self.layout.bitmasks else {}
        bitmasks = sparse if not self.quantizing else {}
        # tensors the layout replaces: a quantized Linear's weight and bias, a bitmask's weight
        replaced = {f"{n}.{t}" for n in quant for t in ("weight", "bias")}
        replaced |= {f"{n}.weight" for n in bitmasks}
        if self.tied:
            replaced.add("lm_head.weight")
        out = {name: self._plain(t) for name, t in state.items() if name not in replaced}
        for n, m in bitmasks.items():
            out.update(bitmask_tensors(n, m.weight.data.to(self.save_dtype)))
        for n, m in quant.items():
            out.update(self._pack_quantized(n, m))
        for n, m in modules.items():
            if getattr(m, "llmc_kv", None) is not None:
                out.update(self._kv_tensors(n, m))
        if self.renames:
            out = {to_checkpoint_name(k, self.renames): v for k, v in out.items()}
        return out

    def _plain(self, t: Tensor) -> Tensor:
        t = t.detach()
        if t.is_floating_point() and t.dtype != self.save_dtype:
            t = t.to(self.save_dtype)
        return t.cpu()

    def _note_pruned(self, m: nn.Module) -> None:
        rec, p = m.llmc_sparsity, self._pruned
        p["structures"].add(rec["structure"])
        p["zeros"] += rec["sparsity"] * m.weight.numel()
        p["total"] += m.weight.numel()
        p["count"] += 1

    def _sparse24_of(self, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The block Linears among ``modules`` whose weights are 2:4 sparse."""
        out = {}
        for n, m in modules.items():
            if isinstance(m, nn.Linear) and n.startswith(self.blocks_prefix) and \
                    is_nm(m.weight.data, 2, 4):
                out[n] = m
                self._sparse24["names"].append(n)
                self._sparse24["zeros"] += int((m.weight.data == 0).sum())
                self._sparse24["total"] += m.weight.numel()
        return out

    def _pack_quantized(self, name: str, m: nn.Module) -> dict[str, Tensor]:
        codes = getattr(m, "llmc_codes", None)  # kept by a streaming walk since compression
        if codes is not None:
            qw = QuantizedWeight(**vars(m.llmc_quant), q=codes.cpu())
        else:
            qw = m.llmc_quant.codes(m.weight.data.cpu(), name)
        bias = m.bias.data.to(self.save_dtype) if m.bias is not None else None
        scheme = (qw.bits, qw.group_size, qw.sym)
        act = getattr(m, "llmc_act", None)
        if (qw.type != "int" or act is not None) and not getattr(self.layout, "activations",
                                                                  False):
            raise ValueError(
                f"{name}: FP8 weights and quantized activations cannot be written as a "
                f"{self.fmt} checkpoint (integer weight-only); use --format compressed-tensors"
            )
        if self.scheme is None:
            self.scheme, self.weight_type, self.activations = scheme, qw.type, act
        elif (scheme, qw.type, act) != (self.scheme, self.weight_type, self.activations) \
                and not getattr(self.layout, "mixed", False):
            raise ValueError(
                f"{name}: the model mixes quantization schemes ({scheme}, {qw.type}, "
                f"activations {act}) and ({self.scheme}, {self.weight_type}, activations "
                f"{self.activations}); one {self.fmt} checkpoint holds one (compressed-tensors "
                "holds several)"
            )
        self.schemes.setdefault(SchemeKey(*scheme, qw.type, qw.block_rows, act), []).append(name)
        self.quantized.append(name)
        if not is_trivial_g_idx(qw.g_idx, qw.group_size):
            self.dynamic = True
        if act is not None:
            return self.writer.pack(name, qw, bias, act=act,
                                    act_scale=getattr(m, "llmc_act_scale", None))
        return self.writer.pack(name, qw, bias)

    def _kv_tensors(self, name: str, m: nn.Module) -> dict[str, Tensor]:
        """``{name}.k_scale`` and ``{name}.v_scale`` of an attention module with a quantized
        KV cache."""
        if not getattr(self.layout, "activations", False):
            raise ValueError(f"{name}: KV-cache scales cannot be written as a {self.fmt} "
                             "checkpoint; use --format compressed-tensors")
        scales = getattr(m, "llmc_kv_scales", None)
        if scales is None:
            raise ValueError(f"{name}: its KV-cache scales were never calibrated")
        if self.kv_cache is None:
            self.kv_cache = m.llmc_kv
        elif m.llmc_kv != self.kv_cache:
            raise ValueError(f"{name}: KV-cache scheme {m.llmc_kv} differs from the model's "
                             f"{self.kv_cache}; one checkpoint holds one")
        return {f"{name}.{s}": t.detach().float().cpu().contiguous()
                for s, t in zip(SCALE_NAMES, scales)}

    def rewrite(self, tensors: dict[str, Tensor], linears: list[str]) -> dict[str, Tensor]:
        """``tensors`` of an earlier piece with the qzeros of ``linears`` (from
        :meth:`v1_linears`) in the final layout."""
        return qzeros_to_v2(tensors, [to_checkpoint_name(n, self.renames) for n in linears],
                            self.scheme[0])

    def state(self) -> dict[str, Any]:
        """What the packer has learnt so far, as JSON (a resumed run reloads it)."""
        return {"scheme": self.scheme, "weight_type": self.weight_type,
                "activations": (None if self.activations is None
                                else dataclasses.asdict(self.activations)),
                "schemes": [[{**k._asdict(), "act": None if k.act is None
                              else dataclasses.asdict(k.act)}, names]
                            for k, names in self.schemes.items()],
                "kv_cache": (None if self.kv_cache is None
                             else dataclasses.asdict(self.kv_cache)),
                "quantized": self.quantized, "dynamic": self.dynamic,
                "pruned": {**self._pruned, "structures": sorted(self._pruned["structures"])},
                "sparse24": self._sparse24, **self.writer.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.scheme = tuple(state["scheme"]) if state["scheme"] is not None else None
        self.weight_type = state.get("weight_type", "int")
        self.activations = (ActScheme(**state["activations"]) if state.get("activations")
                            else None)
        self.kv_cache = (KVCacheScheme(**state["kv_cache"]) if state.get("kv_cache")
                         else None)
        self.schemes = {SchemeKey(**{**k, "act": None if k["act"] is None
                                     else ActScheme(**k["act"])}): list(names)
                        for k, names in state.get("schemes", [])}
        self.quantized = list(state["quantized"])
        self.dynamic = state["dynamic"]
        self._pruned = {**state["pruned"], "structures": set(state["pruned"]["structures"])}
        self._sparse24 = dict(state["sparse24"])
        self.writer.load_state(state)

    def v1_linears(self) -> list[str]:
        """The Linears packed with v1 GPTQ qzeros that need :func:`qzeros_to_v2` now that the
        checkpoint is ``gptq_v2`` (none in other layouts, or when it stayed v1)."""
        return self.writer.v1_linears()

    # -- at the end -----------------------------------------------------------------------------
    def sparsity_record(self) -> dict[str, Any] | None:
        p = self._pruned
        if not p["count"]:
            return self._loaded_sparsity
        return {"structure": ", ".join(sorted(p["structures"])),
                "sparsity": round(p["zeros"] / p["total"], 6),
                "pruned_layers": p["count"], "storage": "dense"}

    def finish(self) -> dict[str, Any]:
        """``config.json``: the model's config, its sparsity record, and the layout's
        ``quantization_config`` when it holds quantized Linears."""
        self.writer.finish()
        config = self.config.to_dict()
        config.pop("quantization_config", None)
        config.pop(SPARSITY_KEY, None)
        record = self.sparsity_record()
        if record is not None:
            config[SPARSITY_KEY] = record
        if self.model_class:
            config["architectures"] = [self.model_class]
        config["dtype"] = str(self.save_dtype).removeprefix("torch.")
        qconfig = self._quantization_config()
        if qconfig is not None:
            config["quantization_config"] = rename_tree(qconfig, self.renames)
        return config

    def act(self) -> str:
        return "dynamic" if self.dynamic else self.act_order

    @property
    def sparse24(self) -> dict[str, Any]:
        return self._sparse24

    def _quantization_config(self) -> dict[str, Any] | None:
        return self.writer.quantization_config(self)

    def modules_in_block(self, quantized: set[str]) -> list[list[str]] | None:
        """GPTQModel's ``modules_in_block_to_quantize`` when only some block Linears are
        quantized (engines then keep the others dense); None when all are."""
        prefix = self.blocks_prefix
        rel = {n[len(prefix):].split(".", 1)[1] for n in quantized if n.startswith(prefix)}
        every = {n[len(prefix):].split(".", 1)[1] for n in self.block_linears}
        if rel == every:
            return None
        return [[n for n in g if n in rel] for g in self.groups if any(n in rel for n in g)]
