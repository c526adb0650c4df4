"""Pruning masks.

A mask here is a bool tensor shaped like the weight [N, K]; ``keep`` masks are True where the
weight stays. Masks come from a score per weight (|W| for magnitude, |W| * ||X_j|| for Wanda):

- unstructured at a ``sparsity``: the lowest-scoring ``round(sparsity * K)`` entries of every
  row (``scope: row``, as Wanda compares) or ``round(sparsity * N * K)`` of the whole layer
  (``scope: layer``);
- N:M semi-structured: in every run of M consecutive input columns of a row, the N
  highest-scoring entries stay (2:4, 4:8, any N < M).

Both are one ``topk`` over a reshaped score tensor, never a loop over columns.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

SCOPES = ("row", "layer")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): N kept of every M; refuses anything else with the expected form."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not m:
        raise ValueError(f"pattern: {pattern!r} is not N:M (e.g. 2:4)")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"pattern: {pattern!r} needs 0 < N < M (N weights kept of every M)")
    return n, mm


def smallest_mask(scores: Tensor, count: int, scope: str = "row") -> Tensor:
    """True at the ``count`` lowest entries of each row of ``scores`` (``scope="row"``) or the
    ``count`` lowest of all of them (``"layer"``)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count <= 0:
        return mask
    if scope == "row":
        idx = torch.topk(scores, min(count, scores.shape[1]), dim=1, largest=False).indices
        return mask.scatter_(1, idx, True)
    idx = torch.topk(scores.flatten(), min(count, scores.numel()), largest=False).indices
    return mask.view(-1).index_fill_(0, idx, True).view_as(scores)


def unstructured_keep(scores: Tensor, sparsity: float, scope: str = "row") -> Tensor:
    """Keep mask pruning ``sparsity`` of each row (or of the layer) by lowest score."""
    N, K = scores.shape
    count = round(sparsity * K) if scope == "row" else round(sparsity * N * K)
    return ~smallest_mask(scores.float(), count, scope)


def nm_keep(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep mask with the ``n`` highest scores of every ``m`` consecutive columns of a row."""
    N, K = scores.shape
    if K % m:
        raise ValueError(f"{K} input columns do not split into groups of {m}")
    s = scores.float().reshape(N, K // m, m)
    idx = torch.topk(s, n, dim=-1).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True).reshape(N, K)


def is_nm(W: Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every ``m`` consecutive inputs of each row of ``W`` hold at most ``n``
    non-zeros."""
    N, K = W.shape
    return K % m == 0 and bool(((W != 0).reshape(N, K // m, m).sum(-1) <= n).all())


def nm_slots(W: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """The ``n`` stored positions of each group of ``m`` inputs of an N:M weight [N, K]:
    long [N, K/m, n] in ascending column order, the non-zeros first and, in a group with fewer
    than ``n``, its first zeros (the storage of 2:4 kernels and compressed-tensors bitmasks).
    Refuses a weight that is not N:M."""
    N, K = W.shape
    if not is_nm(W, n, m):
        raise ValueError(f"the weight is not {n}:{m} sparse (a group of {m} consecutive inputs "
                         f"holds more than {n} non-zeros, or {K} inputs do not split into "
                         f"groups of {m})")
    zero = (W.reshape(N, K // m, m) == 0).to(torch.int8)
    order = torch.sort(zero, dim=-1, stable=True).indices[..., :n]
    return torch.sort(order, dim=-1).values


def sparsity(t: Tensor) -> float:
    """Fraction of exact zeros."""
    return float((t == 0).sum()) / max(t.numel(), 1)


def wanda_scores(W: Tensor, column_norms: Tensor) -> Tensor:
    """Wanda's score ``|W_ij| * ||X_j||_2`` (Sun et al. 2023)."""
    return W.detach().float().abs() * column_norms.to(W.device)[None, :]
