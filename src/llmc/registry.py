"""The registries: name -> (config class, implementation), filled by the modules that define
them (each method in ``llmc.methods``, each checkpoint format in ``llmc.formats``), and the
recipe's sections (calibration, walker settings). The recipe reads only these."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    config_cls: type
    impl: T
    doc: str
    role: str = ""  # methods: quantizer, pruner, transform, distill

    def arguments(self) -> list[tuple[str, Any, str]]:
        """(name, default, type name) of each config field, in declaration order."""
        out = []
        for f in dataclasses.fields(self.config_cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            out.append((f.name, default, type_name))
        return out

    def make_config(self, args: dict[str, Any], where: str = "args") -> Any:
        """Build the frozen config from a recipe's ``args``; unknown keys name the valid ones."""
        return build_dataclass(self.config_cls, args, f"{where} of method '{self.name}'")


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_types(cls: type, values: dict[str, Any], where: str) -> None:
    """Refuse values whose type does not match a dataclass field annotated int, float, bool or
    str (YAML ``sym: "false"`` is a string, not False; ``batch_size: 2.5`` is not an int)."""
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        allowed = _TYPES.get(type_name)
        if not allowed:
            continue
        v = values[f.name]
        wrong = not isinstance(v, allowed) or (bool not in allowed and isinstance(v, bool))
        if wrong:
            raise ValueError(f"{where}: {f.name} must be {type_name}, got {v!r}")


def build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    """``cls(**values)`` with every user error as a ValueError that starts with ``where``:
    unknown keys (naming the valid ones), wrong types, and the class's own checks."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    check_types(cls, values, where)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


class Registry(Generic[T]):
    """Names are normalised (case, '-' vs '_'); duplicates raise; misses list valid names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, config_cls: type, impl: T, doc: str = "",
                 role: str = "") -> None:
        key = normalize(name)
        if key in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[key] = Entry(name.strip(), config_cls, impl, doc, role)

    def get(self, name: str) -> Entry[T]:
        key = normalize(name)
        if key not in self._entries:
            raise ValueError(
                f"unknown {self.kind} '{name}'; valid {self.kind}s: {', '.join(self.names())}"
            )
        return self._entries[key]

    def names(self, role: str | None = None) -> list[str]:
        return sorted(e.name for e in self._entries.values() if role is None or e.role == role)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalize(name) in self._entries


def matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """``re:<regex>`` searches the full module name; a plain string matches the name or its
    last dotted components (``q_proj`` matches ``model.layers.0.self_attn.q_proj``)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


METHODS: Registry[type] = Registry("method")  # filled by llmc.methods
FORMATS: Registry[Any] = Registry("format")  # filled by llmc.formats
# The recipe's sections besides its steps: name -> frozen config dataclass (calibration from
# llmc.calibration, walker from llmc.engine.config)
SECTIONS: dict[str, type] = {}


def register_section(name: str, config_cls: type) -> type:
    SECTIONS[name] = config_cls
    return config_cls
