"""The package's layering (docs/layout.md): every import of an llmc module, function-level ones
included, goes to a lower layer, or stays inside its own package; ``core`` imports nothing else
of llmc and ``recipe`` only the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "llmc"

# Lower numbers sit lower: a module imports only from lower layers (or its own package).
LAYERS = {
    "core": 0,
    "registry": 1,
    "models": 2, "kernels": 2,
    "calibration": 3, "interfaces": 3, "nn": 3,
    "engine": 4, "methods": 4,
    "formats": 5, "eval": 5, "report": 5,
    "recipe": 6,
    "checks": 7,
    "api": 8,
    "cli": 9, "__init__": 9,
    "__main__": 10,  # `python -m llmc`: the command line's entry point
}


def _unit(module: str) -> str:
    """``llmc.methods.gptq`` -> ``methods``; ``llmc`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every llmc import in ``path`` outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "llmc":  # from llmc import methods
                names = [f"llmc.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names if n == "llmc" or n.startswith("llmc.")]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("llmc")]
    return out


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        yield ".".join(rel.parts).removesuffix(".__init__"), path


def test_every_unit_has_a_layer():
    units = {_unit(m) for m, _ in _modules()}
    assert units <= set(LAYERS), f"give these a layer: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("module,path", list(_modules()), ids=lambda x: str(x))
def test_imports_go_down(module, path):
    me = _unit(module)
    for line, target in _imports(path):
        other = _unit(target)
        if other == me:
            continue
        assert other in LAYERS, f"{module}:{line} imports {target}, which has no layer"
        assert LAYERS[other] < LAYERS[me], (
            f"{module}:{line} imports {target}: {other} (layer {LAYERS[other]}) is not below "
            f"{me} (layer {LAYERS[me]})")
        if me == "core":
            raise AssertionError(f"{module}:{line}: core imports no other llmc module")
        if me == "recipe":
            assert target == "llmc.registry", f"{module}:{line}: recipe imports only the registry"
