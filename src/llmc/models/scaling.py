"""Folding per-channel scales through a block: the output channels of a norm or a Linear divided
by ``s``, the input columns of the Linears it feeds multiplied by ``s``, so that the block
computes the same function. AWQ and SmoothQuant move their scales this way, and structure
discovery (:mod:`llmc.models.structure`) uses the same code to check that a pair holds."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class ScalePair:
    """A scaling pair: the output channels of ``prev`` (a norm or a Linear) are divided by
    scales that the ``linears`` it feeds multiply into their input columns. The AWQ search
    measures the output of ``inspect`` (a module containing the linears), or ``tr(dW H dW^T)``
    of the linears when it is None."""

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None
    tokenwise: bool = False  # ``inspect`` treats each token on its own (an MLP)


def scale_prev(module: nn.Module, s: Tensor, norm_offset: float = 0.0) -> None:
    """Divide the output channels of ``module`` (a norm or a Linear) by ``s``."""
    s = s.to(module.weight.device)
    if isinstance(module, nn.Linear):
        module.weight.data.div_(s[:, None])
    elif norm_offset:
        module.weight.data.copy_((norm_offset + module.weight.data) / s - norm_offset)
    else:
        module.weight.data.div_(s)
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.data.div_(s)


def head_tie(block: nn.Module, pair: ScalePair) -> tuple[int, int] | None:
    """``(g, head_dim)`` when ``pair.prev`` is v and each KV head feeds g query heads' inputs of
    o (grouped-query attention); None when channels map one to one."""
    prev = block.get_submodule(pair.prev)
    if not isinstance(prev, nn.Linear):
        return None
    width = block.get_submodule(pair.linears[0]).in_features
    if width == prev.out_features:
        return None
    g = width // prev.out_features
    parent = pair.prev.rsplit(".", 1)[0] if "." in pair.prev else ""
    attn = block.get_submodule(parent)
    head_dim = getattr(attn, "head_dim", None)
    if g * prev.out_features != width or head_dim is None or prev.out_features % head_dim:
        raise ValueError(
            f"AWQ: {pair.prev} ({prev.out_features} outputs) does not map onto the "
            f"{width} inputs of {pair.linears[0]} head by head"
        )
    return g, head_dim


def reduce_tied(v: Tensor | None, tie: tuple[int, int] | None) -> Tensor | None:
    """[n_heads * head_dim] -> [n_kv_heads * head_dim], averaging each KV head's g heads."""
    if v is None or tie is None:
        return v
    g, hd = tie
    return v.reshape(-1, g, hd).mean(dim=1).reshape(-1)


def expand_tied(s: Tensor, tie: tuple[int, int] | None) -> Tensor:
    """[n_kv_heads * head_dim] -> [n_heads * head_dim]: each KV head's scale for its g heads."""
    if tie is None:
        return s
    g, hd = tie
    return s.reshape(-1, 1, hd).expand(-1, g, hd).reshape(-1)


def apply_scales(
    block: nn.Module, pair: ScalePair, s: Tensor, norm_offset: float = 0.0,
    tie: tuple[int, int] | None = None,
) -> Tensor:
    """Move scales ``s`` (one per output channel of ``pair.prev``) from ``pair.prev`` onto the
    Linears it feeds; the block computes the same function. Returns the Linears' input scales
    (``s`` repeated over the heads sharing a KV head when ``tie`` is set)."""
    s_in = expand_tied(s, tie)
    scale_prev(block.get_submodule(pair.prev), s, norm_offset)
    for n in pair.linears:
        m = block.get_submodule(n)
        m.weight.data.mul_(s_in.to(m.weight.device))
    return s_in
