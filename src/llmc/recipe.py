"""Recipes: ordered, validated compression steps plus calibration and walker settings.

Every error that needs no weights (unknown keys or methods, impossible arguments) is raised
when the recipe is built; shape errors are raised by :func:`llmc.checks.check_model` from the
model's config, before its weights load. Recipes are data: this module imports only the
registry.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmc.registry import METHODS, SECTIONS, build_dataclass, matches

# Named schemes (``llmc quantize --scheme``): the quantizer arguments each one sets.
SCHEME_PRESETS: dict[str, dict[str, Any]] = {
    "w4a16": {"bits": 4, "group_size": 128},
    "w8a16": {"bits": 8, "group_size": -1, "sym": True},
    "w8a8-int8": {"bits": 8, "group_size": -1, "sym": True, "act_bits": 8, "act_type": "int"},
    "nvfp4": {"bits": 4, "group_size": 16, "sym": True, "type": "float"},
    "mxfp4": {"bits": 4, "group_size": 32, "sym": True, "type": "float"},
    "nvfp4-w4a4": {"bits": 4, "group_size": 16, "sym": True, "type": "float", "act_bits": 4,
                   "act_type": "float"},
    "mxfp4-w4a4": {"bits": 4, "group_size": 32, "sym": True, "type": "float", "act_bits": 4,
                   "act_type": "float", "act_strategy": "group"},
    "fp8-dynamic": {"bits": 8, "group_size": -1, "sym": True, "type": "float", "act_bits": 8,
                    "act_type": "float"},
    # static: one activation scale per Linear, calibrated on the calibration windows
    "w8a8-int8-static": {"bits": 8, "group_size": -1, "sym": True, "act_bits": 8,
                         "act_type": "int", "act_strategy": "tensor", "act_dynamic": False},
    # DeepSeek-style: FP8 weights in 128 x 128 blocks, FP8 activations per token and 128 inputs
    "fp8-block": {"bits": 8, "group_size": 128, "sym": True, "type": "float", "block_rows": 128,
                  "act_bits": 8, "act_type": "float", "act_strategy": "group"},
    "fp8-static": {"bits": 8, "group_size": -1, "sym": True, "type": "float", "act_bits": 8,
                   "act_type": "float", "act_strategy": "tensor", "act_dynamic": False},
}

DEFAULT_TARGETS = ("re:.*",)
DEFAULT_IGNORE = ("lm_head",)


@dataclass(frozen=True)
class Step:
    """One compression step: a registered method, the Linears it targets and its arguments."""

    method: str
    targets: tuple[str, ...] = DEFAULT_TARGETS
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    args: dict[str, Any] = field(default_factory=dict, compare=False)
    config: Any = None

    def __post_init__(self) -> None:
        entry = METHODS.get(self.method)
        object.__setattr__(self, "method", entry.name)
        for key in ("targets", "ignore"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = (value,)
            if not all(isinstance(v, str) for v in value):
                raise ValueError(f"{key}: expected a list of names or 're:' patterns")
            for v in value:
                if v.startswith("re:"):
                    try:
                        re.compile(v[3:])
                    except re.error as e:
                        raise ValueError(f"{key}: bad regular expression {v!r}: {e}") from None
            object.__setattr__(self, key, tuple(value))
        if self.config is None:
            object.__setattr__(self, "config", entry.make_config(dict(self.args)))

    def selects(self, name: str) -> bool:
        return matches(name, self.targets) and not matches(name, self.ignore)

    def names(self, name: str) -> bool:
        """Whether the targets select ``name`` other than by the catch-all default (how an MoE
        router, dense by default, is asked for)."""
        return matches(name, tuple(t for t in self.targets if t not in DEFAULT_TARGETS))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "targets": list(self.targets),
            "ignore": list(self.ignore),
            "args": dataclasses.asdict(self.config),
        }

    def compressor(self):
        return METHODS.get(self.method).impl(self.config)


_STEP_KEYS = {"method", "targets", "ignore", "args"}
_RECIPE_KEYS = {"steps", "calibration", "walker", "kv_cache"}


def _build(cls: type, data: Any, where: str):
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    return build_dataclass(cls, data, where)


def _static_acts(config: Any) -> bool:
    """Whether a step's activation scales are calibrated (static)."""
    act = getattr(config, "act_scheme", None)
    return act is not None and act.dynamic is not True


def _scheme(config: Any) -> tuple[int, int, bool, bool]:
    return config.bits, config.group_size, config.sym, getattr(config, "full_range", False)


def _with_quantizers(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """An ``awq`` step only rescales: the next quantizer step must quantize with the scheme its
    scales were searched for; without one, an ``rtn`` step with that scheme is added. Before
    ``gptq``, AWQ's own clipping is off and its scales are scored with GPTQ, unless the step's
    args set ``clip`` or ``search``."""
    out = list(steps)
    for i, step in enumerate(steps):
        if step.method != "awq":
            continue
        quantizers = METHODS.names("quantizer")
        j = next((k for k in range(i + 1, len(steps)) if steps[k].method in quantizers), None)
        if j is None:
            bits, group_size, sym, full = _scheme(step.config)
            out.insert(out.index(step) + 1, Step(
                "rtn", targets=step.targets, ignore=step.ignore,
                args={"bits": bits, "group_size": group_size, "sym": sym,
                      **({"full_range": True} if full else {})},
            ))
            continue
        if steps[j].method == "gptq":
            # GPTQ searches each group's clipping on the Hessian itself; AWQ's clamping first
            # only takes range away from it (measured worse on the tiny models of the tests).
            # Scales chosen for round-to-nearest cost GPTQ alone 4% perplexity at 3 bits
            # (benchmarks/results/quant_table.md); scored with GPTQ they can only help it.
            changes = {k: v for k, v in (("clip", False), ("search", "gptq"))
                       if k not in step.args}
            out[out.index(step)] = dataclasses.replace(
                step, config=dataclasses.replace(step.config, **changes))
        if _scheme(steps[j].config) != _scheme(step.config):
            names = ("bits", "group_size", "sym", "full_range")
            have = dict(zip(names, _scheme(steps[j].config)))
            want = dict(zip(names, _scheme(step.config)))
            raise ValueError(
                f"steps[{j}].args: {steps[j].method} quantizes with {have}, but the awq step "
                f"steps[{i}] searched its scales for {want}; give both the same bits, "
                "group_size, sym and full_range"
            )
    return tuple(out)


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]
    # the sections' config classes come from the registry (llmc.calibration.CalibrationConfig,
    # llmc.engine.config.WalkerConfig), so that the recipe imports nothing else
    calibration: Any = field(default_factory=lambda: SECTIONS["calibration"]())
    walker: Any = field(default_factory=lambda: SECTIONS["walker"]())
    # llmc.core.act.KVCacheScheme: keys and values quantized with calibrated static scales
    # (None: the cache stays in the model's dtype)
    kv_cache: Any = None

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("steps: a recipe needs at least one step")
        post = [i for i, s in enumerate(self.steps) if s.method == "distill"]
        if post and post[0] + len(post) != len(self.steps):
            raise ValueError(f"steps[{post[0]}]: a {self.steps[post[0]].method} step trains the "
                             "compressed model, so it must come after every compression step")
        object.__setattr__(self, "steps", _with_quantizers(tuple(self.steps)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if not isinstance(data, dict):
            raise ValueError("a recipe must be a mapping with a 'steps' list")
        unknown = sorted(set(data) - _RECIPE_KEYS)
        if unknown:
            raise ValueError(
                f"unknown recipe key(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(_RECIPE_KEYS))}"
            )
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise ValueError("steps: expected a non-empty list of {method, targets, ignore, args}")
        steps = []
        for i, s in enumerate(raw_steps):
            where = f"steps[{i}]"
            if not isinstance(s, dict) or "method" not in s:
                raise ValueError(f"{where}: each step needs a 'method'")
            bad = sorted(set(s) - _STEP_KEYS)
            if bad:
                raise ValueError(
                    f"{where}: unknown key(s) {', '.join(bad)}; "
                    f"valid: {', '.join(sorted(_STEP_KEYS))}"
                )
            args = s.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError(f"{where}.args: expected a mapping")
            try:
                steps.append(Step(
                    method=s["method"],
                    targets=s.get("targets", DEFAULT_TARGETS),
                    ignore=s.get("ignore", DEFAULT_IGNORE),
                    args=args,
                ))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        return cls(
            steps=tuple(steps),
            calibration=_build(SECTIONS["calibration"], data.get("calibration"), "calibration"),
            walker=_build(SECTIONS["walker"], data.get("walker"), "walker"),
            kv_cache=(None if data.get("kv_cache") is None else
                      _build(SECTIONS["kv_cache"], data["kv_cache"], "kv_cache")),
        )

    @classmethod
    def from_yaml(cls, source: str | Path) -> Recipe:
        """From a YAML file path or a YAML string (``yaml.safe_load`` only)."""
        text = source
        if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                        and source.endswith((".yaml", ".yml"))):
            p = Path(source)
            if not p.is_file():
                raise ValueError(f"recipe file not found: {source}")
            text = p.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"recipe is not valid YAML: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, recipe: Recipe | dict | str | Path) -> Recipe:
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, dict):
            return cls.from_dict(recipe)
        return cls.from_yaml(recipe)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "steps": [s.to_dict() for s in self.steps],
            "calibration": dataclasses.asdict(self.calibration),
            "walker": dataclasses.asdict(self.walker),
        }
        if self.kv_cache is not None:
            out["kv_cache"] = dataclasses.asdict(self.kv_cache)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def needs_calibration(self) -> bool:
        """Whether a step needs calibration data, or scales are calibrated (the KV cache's)."""
        return self.kv_cache is not None or any(
            s.compressor().needs_calibration or _static_acts(s.config) for s in self.steps)
