"""The architecture adapters: where an architecture keeps its blocks, embeddings, norm and head,
the Linears of a block grouped by the input they read, and the scaling pairs, all found by
:mod:`llmc.models.structure` on a small copy of the architecture; no per-architecture table."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from llmc.models.scaling import ScalePair
from llmc.models.structure import Refusal, StructureError, discover


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its parts. ``groups`` lists the Linears of a block (names
    relative to the block) in execution order, those that read the same input together: the
    true-sequential stages of GPTQ. ``tail`` is the last Linear of a block when its output is
    added straight onto the residual stream and nothing follows (``h = residual + tail(x)``):
    the walker then needs to hold only that Linear's inputs, not every chunk's call stack,
    while it compresses it. ``refused`` holds the scaling pairs that were tried and did not
    hold, with the reason."""

    name: str
    blocks: str
    embeddings: tuple[str, ...]
    norm: str | None  # None: a post-norm model with no final norm
    head: str
    groups: tuple[tuple[str, ...], ...]
    tail: str | None = None
    scale_pairs: tuple[ScalePair, ...] = ()
    norm_offset: float = 0.0  # norms computing x * (offset + w) (Gemma: 1)
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    refused: tuple[Refusal, ...] = ()
    experts: tuple[str, ...] = ()  # MoE layers (ExpertList modules), relative to a block
    routers: tuple[str, ...] = ()  # Linears gating experts: dense unless a step names them

    def check_scaling(self, config=None) -> None:
        """Refuse AWQ where no scaling pair of this architecture holds, with the reasons."""
        if not self.scale_pairs:
            why = "; ".join(f"{r.prev or '(nothing)'} -> {', '.join(r.linears)}: {r.reason}"
                            for r in self.refused) or "no norm or Linear feeds its Linears"
            raise ValueError(f"AWQ: no scaling map for architecture '{self.name}': no scaling "
                             f"pair holds ({why})")

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)


# What discovery cannot read, by model_type: a function amending the found adapter. Empty
# today; tests use it to switch parts off.
OVERRIDES: dict[str, Callable[[Adapter], Adapter]] = {}


def get_adapter(config) -> Adapter:
    """The adapter of a model or config, found from its structure; an architecture whose
    structure cannot be read fails with what was not found."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ValueError("the model's config has no model_type; llmc cannot read its structure")
    try:
        s = discover(config)
    except StructureError as e:
        raise ValueError(f"architecture '{model_type}': {e}") from None
    adapter = Adapter(name=model_type, **{f.name: getattr(s, f.name)
                                          for f in dataclasses.fields(s)})
    fix = OVERRIDES.get(model_type)
    return fix(adapter) if fix else adapter


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a block, by name relative to the block."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
