"""Output plumbing shared by the checkpoint writers: atomic output directories, JSON, and
sharded safetensors in the Hugging Face layout.

A checkpoint is written into a temporary directory next to its destination and moved into
place only once complete, so an interrupted export never leaves a half-written model behind
and never destroys the previous one. Tensors are stored as safetensors only (never pickle).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

from llmc.core.safetensors import SafetensorsFile, write_file

logger = logging.getLogger(__name__)


def beyond_weight_only(config: Any) -> bool:
    """Whether a step's config puts weights on a floating-point grid or quantizes activations
    (what only the compressed-tensors layout holds)."""
    return getattr(config, "type", "int") == "float" or getattr(config, "act_bits", 16) != 16


def refuse_beyond_weight_only(recipe: Any, fmt: str) -> None:
    """Refuse a recipe with FP8 weights, quantized activations or a quantized KV cache for a
    ``fmt`` layout that holds integer weight-only Linears."""
    if getattr(recipe, "kv_cache", None) is not None:
        raise ValueError(f"kv_cache: KV-cache scales cannot be written as a {fmt} checkpoint; "
                         "use --format compressed-tensors")
    for i, step in enumerate(getattr(recipe, "steps", ())):
        if beyond_weight_only(step.config):
            raise ValueError(
                f"steps[{i}].args: FP8 weights and quantized activations cannot be written as "
                f"a {fmt} checkpoint (integer weight-only); use --format compressed-tensors"
            )


def _is_nonempty(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@contextmanager
def atomic_output_dir(
    path: str | os.PathLike[str], overwrite: bool = False, expected_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a fresh temporary directory ``{parent}/.{name}.tmp-XXXX``; on success move it to
    ``path``.

    Refuses an existing non-empty ``path`` unless ``overwrite``; when overwriting, the old
    output is removed only after the new one has been moved into place. With
    ``expected_bytes``, refuses to start when the file system holding ``path`` has less free
    space. On any exception (KeyboardInterrupt included) the temporary directory is removed
    and the exception re-raised; ``path`` is left untouched.
    """
    path = Path(path)
    if _is_nonempty(path) and not overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a directory; remove it or choose another path")
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if expected_bytes is not None:
        free = shutil.disk_usage(parent).free
        if free < expected_bytes:
            raise ValueError(
                f"not enough free disk space in {parent}: the output needs about "
                f"{_gib(expected_bytes)} but only {_gib(free)} is free; free some space or "
                "choose another output directory"
            )
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        yield tmp
        move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is set aside first and deleted last."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        old.rmdir()
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote %s", path)


def save_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON (UTF-8, trailing newline)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def tensor_nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def save_sharded_safetensors(
    out_dir: str | os.PathLike[str], tensors: dict[str, Tensor], max_shard_bytes: int
) -> list[str]:
    """Write ``tensors`` (in their given order) to ``model.safetensors``, or, past
    ``max_shard_bytes``, to ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``).

    A tensor larger than ``max_shard_bytes`` gets a shard of its own. Returns the file names
    written.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: {max_shard_bytes} must be positive")
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = tensor_nbytes(t)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_file(out_dir / SINGLE_FILE, shards[0], metadata=meta)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        write_file(out_dir / fname, shard, metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(tensor_nbytes(t) for t in tensors.values())
    save_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, INDEX_FILE]


def read_checkpoint_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """All tensors of a safetensors checkpoint directory (sharded or not), on CPU."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no .safetensors files; point to a checkpoint directory")
    tensors: dict[str, Tensor] = {}
    for fname in files:
        f = SafetensorsFile(path / fname)
        tensors.update({k: f.read(k) for k in f.keys()})
    return tensors


def plain_tensors(state: dict[str, Tensor], config_dict: dict[str, Any]) -> dict[str, Tensor]:
    """Drop the tied ``lm_head.weight`` and clone any other tensor that shares storage."""
    out: dict[str, Tensor] = {}
    tied = bool(config_dict.get("tie_word_embeddings", False))
    seen: set[int] = set()
    for name, t in state.items():
        if tied and name == "lm_head.weight":
            logger.info("tie_word_embeddings: not saving lm_head.weight (tied to the embedding)")
            continue
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.detach().clone() if ptr in seen else t.detach()
        seen.add(ptr)
    return out


def write_quantized_checkpoint(
    out_dir: str | os.PathLike[str],
    state: dict[str, Tensor],
    quantized: dict[str, tuple[Any, Tensor | None]],
    pack: Callable[[str, Any, Tensor | None], dict[str, Tensor]],
    config_dict: dict[str, Any],
    qconfig: dict[str, Any],
    max_shard_bytes: int = 2_000_000_000,
) -> list[str]:
    """Write a quantized checkpoint into ``out_dir``: the non-quantized tensors of ``state``
    (see :func:`plain_tensors`), each quantized module's tensors from ``pack(name, codes,
    bias)``, sharded safetensors, and ``config.json`` (``config_dict`` plus
    ``quantization_config = qconfig``). Returns the file names written."""
    tensors = plain_tensors(state, config_dict)
    for name, (qw, bias) in quantized.items():
        if f"{name}.weight" in tensors:
            raise ValueError(
                f"{name}.weight is both in state and quantized; leave quantized modules out of "
                "state"
            )
        for key, t in pack(name, qw, bias).items():
            if key in tensors:
                raise ValueError(f"{key} is both in state and produced by {name}")
            tensors[key] = t
    files = save_sharded_safetensors(out_dir, tensors, max_shard_bytes)
    save_json(Path(out_dir) / "config.json", {**config_dict, "quantization_config": qconfig})
    logger.info("wrote %d tensors (%d %s modules) to %s", len(tensors), len(quantized),
                qconfig.get("quant_method"), out_dir)
    return [*files, "config.json"]


class StatelessWriter:
    """What a layout's checkpoint writer needs when it learns nothing while packing (AWQ,
    compressed-tensors): no GPTQ v1 qzeros to rewrite, nothing to report, no resume state."""

    def v1_linears(self) -> list[str]:
        return []

    def finish(self) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass
