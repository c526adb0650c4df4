"""Helpers for the nested arguments and outputs of a block's forward (tuples, lists, dicts
holding tensors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


def first_tensor(out: Any) -> Tensor:
    """A module's main output: the first element of a tuple or list, else the output itself."""
    return out[0] if isinstance(out, (tuple, list)) else out


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor inside nested tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def cast_floats(obj: Any, dtype: Any, device: Any) -> Any:
    """Every tensor of ``obj`` moved to ``device``; floating ones also cast to ``dtype``
    (position embeddings and float masks follow the forward dtype)."""
    return map_tensors(
        obj, lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)
    )
