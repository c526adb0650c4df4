"""The checks a recipe gets against a model's config before any weight loads: calibration
windows that fit the model's positions, targets that match Linears, group sizes that fit their
layers (and divide them where a checkpoint format needs whole groups), and each method's own
check of the architecture."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from llmc.interfaces import TRANSFORM
from llmc.models import get_adapter
from llmc.models.moe import unfuse_experts
from llmc.recipe import Recipe


def check_seqlen(recipe: Recipe, config: Any, seqlen: int | None = None) -> None:
    """Calibration windows must fit the model's positions (OPT's are learned)."""
    seqlen = seqlen or recipe.calibration.seqlen
    max_pos = getattr(config, "max_position_embeddings", None)
    if recipe.needs_calibration and max_pos and seqlen > max_pos:
        raise ValueError(
            f"calibration.seqlen: {seqlen} is longer than the model's {max_pos} positions; "
            f"use at most {max_pos}"
        )


def check_model(recipe: Recipe, config: Any, divisible_groups: str | None = None,
                skeleton: Any = None) -> None:
    """Shape checks from the model config alone (weights stay on disk): every step targets
    at least one Linear of the blocks, and no group is wider than a targeted layer. With
    ``divisible_groups`` (the name of a checkpoint format whose engines need it), every
    group size must divide the width of every Linear it quantizes. ``skeleton``: the model
    already built on the meta device, if there is one."""
    adapter = get_adapter(config)
    if skeleton is None:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        unfuse_experts(skeleton, config.model_type)  # MoE experts as the walker sees them
    linears = {}
    for b, block in enumerate(adapter.get_blocks(skeleton)):
        for n, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                linears[f"{adapter.blocks}.{b}.{n}"] = m.in_features
    for i, step in enumerate(recipe.steps):
        comp = step.compressor()
        if comp.kind == TRANSFORM:
            try:
                comp.check_model(config, adapter)
            except ValueError as e:
                raise ValueError(f"steps[{i}] ({step.method}): {e}") from None
        chosen = {n: k for n, k in linears.items() if step.selects(n)}
        if not chosen:
            raise ValueError(
                f"steps[{i}].targets: {list(step.targets)} (minus ignore {list(step.ignore)}) "
                "matches no Linear in the model's blocks"
            )
        nm = getattr(step.config, "nm", None)
        if nm:
            bad = sorted(n for n, k in chosen.items() if k % nm[1])
            if bad:
                raise ValueError(
                    f"steps[{i}].args.pattern: {step.config.pattern} needs input widths "
                    f"divisible by {nm[1]}, but {bad[0]} has {chosen[bad[0]]}; leave such "
                    "layers out with the step's `ignore`"
                )
        act = getattr(step.config, "act_scheme", None)
        width = act.group_width if act is not None else None
        if width:
            bad = sorted(n for n, k in chosen.items() if k % width)
            if bad:
                raise ValueError(
                    f"steps[{i}].args: activations quantized in groups of {width} need input "
                    f"widths divisible by {width}, but {bad[0]} has {chosen[bad[0]]}; leave "
                    "such layers out with the step's `ignore`"
                )
        scheme = getattr(step.config, "scheme", None)
        g = scheme.group_size if scheme is not None else None
        if g is not None and g != -1:
            ragged = sorted(n for n, k in chosen.items() if k % g)
            if divisible_groups and ragged:
                raise ValueError(
                    f"steps[{i}].args.group_size: {g} does not divide the input width "
                    f"{chosen[ragged[0]]} of {ragged[0]}, and {divisible_groups} engines "
                    "need whole groups; use a group size that divides every width, or "
                    "--format gptq"
                )
            name, k = min(chosen.items(), key=lambda kv: kv[1])
            if g > k:
                raise ValueError(
                    f"steps[{i}].args.group_size: {g} is larger than the input width {k} of "
                    f"{name}; use a group size of at most {k}, or -1 for per-channel"
                )
