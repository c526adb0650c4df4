"""Magnitude pruning and Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for
Large Language Models"): prune by ``|W_ij| * ||X_j||_2``, the weight times the norm of its input
channel over the calibration tokens; no weight update."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.prune.masks import PruneArgs


class ColumnNormStats:
    """Sum over calibration tokens of each input channel's square (float32): Wanda's
    ``||X_j||_2^2``."""

    def __init__(self, in_features: int) -> None:
        self.sq = torch.zeros(in_features, dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: Tensor) -> None:
        x = inp.detach().reshape(-1, inp.shape[-1])
        if self.sq.device != x.device:
            self.sq = self.sq.to(x.device)
        for r in range(0, x.shape[0], 8192):
            self.sq += x[r : r + 8192].float().square().sum(dim=0)
        self.nsamples += x.shape[0]

    @property
    def norms(self) -> Tensor:
        return self.sq.sqrt()


def wanda_scores(W: Tensor, column_norms: Tensor) -> Tensor:
    return W.detach().float().abs() * column_norms.to(W.device)[None, :]


@dataclass(frozen=True)
class MagnitudeConfig(PruneArgs):
    """Arguments of the ``magnitude`` step: prune by |W| (no data unless ``owl`` needs it);
    ranked over the whole layer by default, as the usual baseline."""

    scope: str = "layer"


@dataclass(frozen=True)
class WandaConfig(PruneArgs):
    """Arguments of the ``wanda`` step, ranked per output row by default as in the paper.
    ``true_sequential``: each group of Linears sees inputs that went through the pruned
    Linears before it in the block (one forward pass per block)."""

    true_sequential: bool = True
