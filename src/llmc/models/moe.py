"""Mixture-of-experts layers as one module per expert, each with its own Linears.

transformers 5 keeps the experts of an MoE layer fused: one module holding 3-D parameters
(``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]) and running each expert on the tokens
its router sends it. llmc's walker compresses Linears, each from its own inputs, so
:func:`unfuse_experts` replaces every such module by an :class:`ExpertList`: expert ``e`` is a
module with three ``nn.Linear`` (gate, up, down) holding ``gate_up_proj[e]`` split in two and
``down_proj[e]``, named as the original checkpoint names them (Mixtral ``w1``/``w3``/``w2``,
Qwen ``gate_proj``/``up_proj``/``down_proj``, read off transformers' checkpoint conversion
mapping), and the forward computes what the fused module computed (checked on every
architecture by :mod:`llmc.models.structure`).

Two things differ from the fused forward, neither changing its output: every expert is called
on every forward, with the (possibly empty) rows routed to it, so that each calibration chunk
reaches each expert's Linears in the same order (the walker's lockstep relies on that); and with
``route_all`` set, each expert runs on every token while only the routed rows reach the output,
so that an expert's statistics see all calibration tokens (the walker's ``all_experts``).

The router stays what it is (not an ``nn.Linear`` in these models); shared experts are ordinary
MLPs. Checkpoint names: :func:`checkpoint_renames` gives transformers' plain renamings
(Mixtral's ``block_sparse_moe`` -> ``mlp``) so writers use the original names.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``; ``names`` are the attribute names of the
    gate, up and down Linears."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inter: int, act: nn.Module,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.names = names
        g, u, d = names
        setattr(self, g, nn.Linear(hidden, inter, bias=False, device=device, dtype=dtype))
        setattr(self, u, nn.Linear(hidden, inter, bias=False, device=device, dtype=dtype))
        setattr(self, d, nn.Linear(inter, hidden, bias=False, device=device, dtype=dtype))
        self.act_fn = act

    def forward(self, x: Tensor) -> Tensor:
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act_fn(g(x)) * u(x))


class ExpertList(nn.ModuleList):
    """The experts of one MoE layer, called like the fused module they replace:
    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

    ``routed`` is the number of rows routed to the expert being called (read by the walker's
    statistics hooks while that expert runs); ``route_all`` runs each expert on every token."""

    route_all = False

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__(experts)
        self.routed = 0

    def forward(self, hidden_states: Tensor, top_k_index: Tensor,
                top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            # (k position, token) pairs in the order the fused forward takes them
            top_k_pos, token_idx = torch.where((top_k_index == e).T)
            self.routed = int(token_idx.numel())
            if self.route_all:
                # a copy per expert: each expert's Linears read their own input tensor, as
                # when routed (structure discovery groups Linears by the tensor they read)
                y = expert(hidden_states.clone())[token_idx]
            else:
                y = expert(hidden_states[token_idx])
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _fused(m: nn.Module) -> bool:
    w = getattr(m, "down_proj", None)
    gu = getattr(m, "gate_up_proj", None)
    return isinstance(w, nn.Parameter) and w.dim() == 3 and isinstance(gu, nn.Parameter) \
        and gu.dim() == 3


def expert_names(model_type: str | None) -> tuple[str, str, str]:
    """The per-expert names of the gate, up and down projections in the original checkpoints
    of ``model_type``, from transformers' conversion mapping (``experts.*.w1.weight`` ...
    merged into ``experts.gate_up_proj``); gate_proj/up_proj/down_proj when it has none."""
    gate, up, down = DEFAULT_NAMES
    for conv in _mapping(model_type):
        sources = getattr(conv, "source_patterns", None)
        target = getattr(conv, "target_patterns", None)
        if not sources or not target or type(conv).__name__ != "WeightConverter":
            continue
        target = target[0] if isinstance(target, (list, tuple)) else target
        sources = [sources] if isinstance(sources, str) else list(sources)
        parts = [re.search(r"experts\.\*\.([A-Za-z0-9_]+)\.weight$", s) for s in sources]
        if not all(parts):
            continue
        names = [p.group(1) for p in parts]
        if target.endswith("experts.gate_up_proj") and len(names) == 2:
            gate, up = names
        elif target.endswith("experts.down_proj") and len(names) == 1:
            down = names[0]
    return gate, up, down


def _mapping(model_type: str | None) -> list[Any]:
    if not model_type:
        return []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # an older transformers: fused experts do not exist there either
        return []
    return list(get_checkpoint_conversion_mapping(model_type) or [])


def checkpoint_renames(model_type: str | None) -> list[tuple[str, str]]:
    """``(in the model, in the checkpoint)`` substring pairs from transformers' plain renamings
    of ``model_type`` (Mixtral: ``(".mlp.", ".block_sparse_moe.")``); writers apply them to
    the names they write and readers undo them."""
    return checkpoint_renames_of(_mapping(model_type))


def checkpoint_renames_of(mapping: list[Any]) -> list[tuple[str, str]]:
    pairs = []
    for conv in mapping:
        if type(conv).__name__ != "WeightRenaming":
            continue
        src, dst = conv.source_patterns, conv.target_patterns
        src = src[0] if isinstance(src, (list, tuple)) and len(src) == 1 else src
        dst = dst[0] if isinstance(dst, (list, tuple)) and len(dst) == 1 else dst
        if isinstance(src, str) and isinstance(dst, str) and re.fullmatch(r"[\w.]+", src) \
                and re.fullmatch(r"[\w.]+", dst):
            pairs.append((dst.replace("\\", ""), src.replace("\\", "")))
    return pairs


def unsupported_conversion(model_type: str | None) -> str | None:
    """Why llmc cannot read the original checkpoints of ``model_type`` tensor by tensor (None:
    it can): transformers' conversion mapping does more than plain renamings and merging
    per-expert projections into fused experts."""
    for conv in _mapping(model_type):
        kind = type(conv).__name__
        if kind == "WeightRenaming" and checkpoint_renames_of([conv]):
            continue
        if kind == "WeightConverter":
            target = conv.target_patterns
            target = target[0] if isinstance(target, (list, tuple)) else target
            if str(target).endswith(("experts.gate_up_proj", "experts.down_proj")):
                continue
        return f"{kind} {getattr(conv, 'source_patterns', '')} -> " \
               f"{getattr(conv, 'target_patterns', '')}"
    return None


def _rename(name: str, pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return name
    name = f".{name}."  # patterns like ".mlp." also match a name's first or last part
    for a, b in pairs:
        name = name.replace(a, b)
    return name[1:-1]


def to_checkpoint_name(name: str, renames: list[tuple[str, str]]) -> str:
    """A tensor or module name of the model as the original checkpoint names it."""
    return _rename(name, renames)


def from_checkpoint_name(name: str, renames: list[tuple[str, str]]) -> str:
    """A name of the original checkpoint as the model (transformers 5) names it."""
    return _rename(name, [(b, a) for a, b in renames])


def rename_tree(obj: Any, renames: list[tuple[str, str]]) -> Any:
    """Every string inside lists and dicts of ``obj`` (a quantization config) renamed with
    :func:`to_checkpoint_name`."""
    if not renames:
        return obj
    if isinstance(obj, str):
        return to_checkpoint_name(obj, renames)
    if isinstance(obj, list):
        return [rename_tree(v, renames) for v in obj]
    if isinstance(obj, dict):
        return {rename_tree(k, renames): rename_tree(v, renames) for k, v in obj.items()}
    return obj


# The layout llmc splits, in the attributes transformers' experts decorator sets.
_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False,
           "is_concatenated": True, "has_post_expert_norm": False}


def _refuse(name: str, m: nn.Module) -> str | None:
    """Why the fused experts ``m`` cannot be split (None: they can)."""
    bad = {k: getattr(m, k, d) for k, d in _LAYOUT.items() if getattr(m, k, d) != d}
    if bad or not hasattr(m, "act_fn"):
        what = ", ".join(f"{k}={v}" for k, v in bad.items()) or "no act_fn"
        return (f"{name} ({type(m).__name__}) stores its experts in a layout llmc cannot split "
                f"yet ({what}); llmc splits gate_up_proj [E, 2I, H] and down_proj [E, H, I] "
                "with a gate, no bias")
    return None


def unfuse_experts(model: nn.Module, model_type: str | None = None) -> list[str]:
    """Replace every fused experts module of ``model`` (in place) by an :class:`ExpertList`;
    returns the names of the replaced modules. Works on meta-device skeletons (the Linears
    stay on the meta device) and on loaded models (each expert gets its own copy of its rows
    and the fused parameters go)."""
    if model_type is None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
    names = expert_names(model_type)
    replaced = []
    for name, m in list(model.named_modules()):
        if not name or not _fused(m):
            continue
        why = _refuse(name, m)
        if why:
            raise ValueError(why)
        gu, down = m.gate_up_proj, m.down_proj
        E, two_i, H = gu.shape
        inter = two_i // 2
        if down.shape != (E, H, inter):
            raise ValueError(f"{name}: down_proj {tuple(down.shape)} does not match "
                             f"gate_up_proj {tuple(gu.shape)}")
        experts = []
        for e in range(E):
            ex = Expert(names, H, inter, m.act_fn, device=gu.device, dtype=gu.dtype)
            if not gu.is_meta:
                g, u, d = (getattr(ex, n) for n in names)
                with torch.no_grad():
                    g.weight.copy_(gu[e, :inter])
                    u.weight.copy_(gu[e, inter:])
                    d.weight.copy_(down[e])
            experts.append(ex)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ExpertList(experts))
        replaced.append(name)
    return replaced


def expert_lists(module: nn.Module) -> dict[str, ExpertList]:
    """The :class:`ExpertList` modules under ``module``, by relative name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, ExpertList)}
