"""What a model costs to store, and the one-table comparison of several models
(``llmc evaluate --compare``).

Size on disk is the bytes of the model's weight files (its ``.safetensors`` shards, or the
``.gguf`` file). Bits per weight are counted over the Linear layers of the decoder blocks (what
compression targets; embeddings and the output head are left out): every stored byte of a
Linear (codes, scales, zero points, group indices, sparsity metadata) over its weight count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

HEAD_NAMES = ("lm_head", "embed_out", "output")  # output heads, left out of bits per weight


def weight_files(source: str) -> list[Path]:
    """The files holding a model's weights: a directory's safetensors shards, or a GGUF file
    (a demo name is resolved to its file); [] for a hub id not on disk."""
    from llmc.models import resolve

    src = resolve(source)
    if src.gguf_file:
        return [Path(src.path) / src.gguf_file]
    p = Path(src.path)
    return sorted(p.glob("*.safetensors")) if p.is_dir() else []


def _block_linears(model: nn.Module) -> dict[str, int]:
    """{module name: weight count} of the Linear-like modules inside the decoder blocks."""
    from llmc.models import get_adapter

    try:
        prefix = get_adapter(model.config).blocks + "."
    except ValueError:  # a structure discovery cannot read: count every Linear but the head
        prefix = ""
    out = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in HEAD_NAMES or not name.startswith(prefix):
            continue
        if isinstance(module, nn.Linear):
            out[name] = module.in_features * module.out_features
        elif hasattr(module, "in_features") and hasattr(module, "out_features"):
            out[name] = int(module.in_features) * int(module.out_features)
    return out


def _gguf_block_bytes(path: Path) -> tuple[int, int]:
    """(bytes, weight count) of a GGUF file's block matrices (``blk.N.*`` with two dims)."""
    from gguf import GGUFReader

    total = count = 0
    for t in GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and len([d for d in t.shape if d > 1]) == 2:
            total += int(t.n_bytes)
            count += math.prod(int(d) for d in t.shape)
    return total, count


def footprint(source: str, model: nn.Module) -> dict[str, Any]:
    """``{"size_bytes", "bits_per_weight", "files"}`` of a model read from ``source`` (size
    None for a hub id not on disk; bits per weight None where no block Linear was found)."""
    from llmc.core.safetensors import SafetensorsFile

    files = weight_files(source)
    size = sum(f.stat().st_size for f in files) if files else None
    total = count = 0
    if files and files[0].suffix == ".gguf":
        total, count = _gguf_block_bytes(files[0])
    elif files:
        linears = _block_linears(model)
        entries = [(name, st.nbytes(name)) for st in map(SafetensorsFile, files)
                   for name in st.keys()]
        for module, n in linears.items():
            stored = sum(b for name, b in entries if name.startswith(module + "."))
            if stored:
                total, count = total + stored, count + n
    return {"size_bytes": size, "bits_per_weight": 8 * total / count if count else None,
            "files": len(files)}


def _fmt(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a markdown table: one row per model; perplexity, every task metric
    (with lm-eval's stderr), size on disk and bits per weight."""
    metrics: list[str] = []
    for r in rows:
        metrics += [m for m in r.get("tasks", {}) if m not in metrics]
    has_ppl = any(r.get("perplexity") is not None for r in rows)
    head = ["model"] + (["perplexity"] if has_ppl else []) + metrics + ["size (MB)",
                                                                        "bits/weight"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"]]
        if has_ppl:
            cells.append(_fmt(r.get("perplexity"), 3))
        for m in metrics:
            value, err = r.get("tasks", {}).get(m), r.get("stderr", {}).get(m)
            cells.append(_fmt(value, 4) + ("" if err is None else f" ± {err:.4f}"))
        size = r.get("size_bytes")
        cells += [_fmt(None if size is None else size / 1e6, 1), _fmt(r.get("bits_per_weight"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
