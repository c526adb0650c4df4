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

    :meth:`make_exact` (before the first batch) keeps the sums in float64 instead, each batch's
    float32 products added as they are: the sum then hardly depends on the order of the
    batches, so data split over processes (:mod:`llmc.engine.distributed`) gives the H of one
    process. :meth:`reduce` sums the statistics of every process.
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
        exact = self._upper.dtype == torch.float64
        for r in range(0, n, self.chunk):
            xs = x[r : r + self.chunk].float()
            for a, b in self._spans:
                if exact:  # this batch's products on their own, then added in float64
                    self._upper[a:b, a:] += xs[:, a:b].T @ xs[:, a:]
                else:
                    self._upper[a:b, a:].addmm_(xs[:, a:b].T, xs[:, a:])
        self.nsamples += n

    def make_exact(self) -> None:
        """Sums in float64 from now on (call before the first batch)."""
        if self.nsamples:
            raise RuntimeError("HessianStats.make_exact: call it before the first batch")
        self._upper = self._upper.double()

    def reduce(self, comm) -> None:
        """The sums of every process (``comm``: a :class:`~llmc.engine.distributed.Distributed`);
        call before reading H."""
        comm.all_reduce(self._upper)
        self.nsamples = comm.all_reduce_int(self.nsamples)

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
            if H.dtype != torch.float32:  # exact sums: the methods solve in float32
                H = H.float()
                self._upper = H
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

    def make_exact(self) -> None:
        """Sums in float64 (see :meth:`HessianStats.make_exact`)."""
        if self.nsamples:
            raise RuntimeError("ColumnNormStats.make_exact: call it before the first batch")
        self.sq = self.sq.double()

    def reduce(self, comm) -> None:
        comm.all_reduce(self.sq)
        self.nsamples = comm.all_reduce_int(self.nsamples)

    @property
    def norms(self) -> Tensor:
        return self.sq.float().sqrt()


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

    def reduce(self, comm) -> None:
        """The maximum over every process (exact in any order)."""
        self.amax = comm.all_reduce(self.amax.reshape(1).clone(), "max").reshape(())
        self.nsamples = comm.all_reduce_int(self.nsamples)


def require_inputs(name: str, stats: object) -> None:
    """Refuse to compress ``name`` from statistics that saw no input."""
    if stats is None or getattr(stats, "nsamples", 0) == 0:
        raise ValueError(f"{name}: no calibration inputs reached this layer")


def consumed(stats: object) -> None:
    """One Linear was compressed from ``stats`` (see :meth:`HessianStats.consumed`)."""
    if isinstance(stats, HessianStats):
        stats.consumed()
