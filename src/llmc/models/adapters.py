"""The architecture adapters: where an architecture keeps its blocks, embeddings, norm and head,
the Linears of a block grouped by the input they read, and AWQ's scaling pairs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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
