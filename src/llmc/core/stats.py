"""Calibration statistics of a Linear's inputs: the Hessian ``2 X^T X`` (GPTQ, SparseGPT, AWQ's
loss) and the squared column norms (Wanda). The Linears that read one input share one object."""

from __future__ import annotations

import torch
from torch import Tensor


class HessianStats:
    """``H = (2 / n) * sum_x x x^T`` over the n rows of a Linear's inputs (the sum is kept and
    scaled when read).

    Inputs arrive as ``(..., K)`` in any float dtype; products and sums are float32 (bf16
    products rounded to bf16 made H indefinite on real attention inputs). Only the upper
    triangle is accumulated, in column blocks: about 60% of the multiply-adds of ``X^T X``.
    """

    def __init__(self, in_features: int, chunk: int = 8192) -> None:
        self._upper = torch.zeros(in_features, in_features, dtype=torch.float32)
        self._H: Tensor | None = None
        # The factor of H^-1 the Linears of a group share, kept until the last of them
        # (``readers``, set by the walker; None: until these statistics are dropped).
        self.factors: dict = {}
        self.readers: int | None = None
        self.nsamples = 0
        self.chunk = chunk
        blocks = 4 if in_features >= 1024 else 2 if in_features >= 512 else 1
        # column blocks [a, b) whose rows [a, b) x columns [a, K) make up the upper triangle
        self._spans = [
            (in_features * i // blocks, in_features * (i + 1) // blocks) for i in range(blocks)
        ]

    def add_batch(self, inp: Tensor) -> None:
        if self._H is not None:
            raise RuntimeError("HessianStats: H was read already (it is built in place); "
                               "feed every batch before reading it")
        x = inp.detach().reshape(-1, inp.shape[-1])
        n = x.shape[0]
        if self._upper.device != x.device:
            self._upper = self._upper.to(x.device)
        for r in range(0, n, self.chunk):
            xs = x[r : r + self.chunk].float()
            for a, b in self._spans:
                self._upper[a:b, a:].addmm_(xs[:, a:b].T, xs[:, a:])
        self.nsamples += n

    def consumed(self) -> None:
        """One Linear is compressed from these statistics; after the last, the shared factor
        goes (before that Linear's output error is measured, so the peak does not grow)."""
        if self.readers is not None:
            self.readers -= 1
            if self.readers <= 0:
                self.factors.clear()

    @property
    def H(self) -> Tensor:
        """The full symmetric [K, K] Hessian, built in place of the sums (one K x K matrix, not
        two: 485 MB for an 11008-wide input)."""
        if self._H is None:
            H = self._upper.mul_(2.0 / max(self.nsamples, 1))
            for a, b in self._spans:
                H[b:, a:b] = H[a:b, b:].T
                H[a:b, a:b] = torch.triu(H[a:b, a:b]) + torch.triu(H[a:b, a:b], 1).T
            self._H = H
        return self._H


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


class AbsMaxStats:
    """``max |x|`` over every calibration input of a Linear (a static activation scale's
    range), float32."""

    def __init__(self, in_features: int) -> None:
        self.amax = torch.zeros((), dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: Tensor) -> None:
        a = inp.detach().abs().amax().float()
        self.amax = torch.maximum(self.amax.to(a.device), a)
        self.nsamples += inp.numel() // inp.shape[-1]


def require_inputs(name: str, stats: object) -> None:
    """Refuse to compress ``name`` from statistics that saw no input."""
    if stats is None or getattr(stats, "nsamples", 0) == 0:
        raise ValueError(f"{name}: no calibration inputs reached this layer")


def consumed(stats: object) -> None:
    """One Linear was compressed from ``stats`` (see :meth:`HessianStats.consumed`)."""
    if isinstance(stats, HessianStats):
        stats.consumed()
