"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a Linear's weight column by column, spreading each column's
rounding error over the columns not yet quantized with the inverse Hessian ``H = 2 X^T X`` of
the layer's inputs (Algorithm 1, with lazy batch updates and a Cholesky form of ``H^-1``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.quant.scheme import (
    ClipSearch,
    QuantArgs,
    QuantizedWeight,
    QuantScheme,
    find_qparams,
    grouped_qparams,
    quantize,
)

log = logging.getLogger(__name__)

ACT_ORDERS = ("none", "static", "dynamic")


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
        self.nsamples = 0
        self.chunk = chunk
        blocks = 4 if in_features >= 1024 else 2 if in_features >= 512 else 1
        # column blocks [a, b) whose rows [a, b) x columns [a, K) make up the upper triangle
        self._spans = [
            (in_features * i // blocks, in_features * (i + 1) // blocks) for i in range(blocks)
        ]

    def add_batch(self, inp: Tensor) -> None:
        x = inp.detach().reshape(-1, inp.shape[-1])
        n = x.shape[0]
        if self._upper.device != x.device:
            self._upper = self._upper.to(x.device)
        for r in range(0, n, self.chunk):
            xs = x[r : r + self.chunk].float()
            for a, b in self._spans:
                self._upper[a:b, a:].addmm_(xs[:, a:b].T, xs[:, a:])
        self.nsamples += n
        self._H = None

    @property
    def H(self) -> Tensor:
        """The full symmetric [K, K] Hessian."""
        if self._H is None:
            H = self._upper * (2.0 / max(self.nsamples, 1))
            for a, b in self._spans:
                H[b:, a:b] = H[a:b, b:].T
                H[a:b, a:b] = torch.triu(H[a:b, a:b]) + torch.triu(H[a:b, a:b], 1).T
            self._H = H
        return self._H


def _inverse_cholesky(H: Tensor, damp: float, name: str) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``; one retry at 10x damp."""
    if not torch.isfinite(H).all():
        raise ValueError(
            f"{name}: the Hessian has inf/NaN entries (activations overflowed); calibrate with "
            "walker dtype float32 (--dtype float32)"
        )
    mean_diag = torch.mean(torch.diag(H)).item()
    for attempt, d in enumerate((damp, damp * 10)):
        Hd = H.clone()
        Hd.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                if attempt:
                    log.warning("%s: Hessian not positive definite; used damp=%g", name, d)
                return U, d
    raise ValueError(
        f"{name}: the Hessian is not positive definite even with damp={damp * 10:g}; "
        "raise `damp` (e.g. 0.1) or use more calibration samples"
    )


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    scheme: QuantScheme,
    *,
    act_order: str = "static",
    damp: float = 0.01,
    block_size: int = 128,
    clip: ClipSearch | None = None,
    name: str = "linear",
) -> QuantizedWeight:
    """Quantize ``W`` ([N, K]) against the Hessian ``H`` ([K, K]) of its inputs.

    act_order: ``none`` keeps the column order, each group's qparams computed when the loop
    reaches it (on the updated weights); ``static`` computes every group's qparams up front from
    the original weights in the original order (``g_idx = k // group_size``) and then processes
    columns by descending ``diag(H)``; ``dynamic`` processes columns by descending ``diag(H)`` and
    computes each group's qparams at its first permuted column on the updated weights
    (``g_idx[perm[i]] = i // group_size``). Inputs with ``diag(H) == 0`` (dead) get ``H = 1``
    there and their weight column zeroed. ``clip`` searches each group's clipping range,
    weighted by ``diag(H)``.
    """
    if act_order not in ACT_ORDERS:
        raise ValueError(f"act_order: {act_order!r} is not one of {', '.join(ACT_ORDERS)}")
    W = W.detach().float().clone()
    H = H.detach().float().to(W.device).clone()
    N, K = W.shape
    width = scheme.group_width(K)
    per_channel = scheme.group_size == -1

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    importance = torch.diag(H)

    if per_channel:
        s, z = find_qparams(W, scheme, clip, importance)
        scales, zeros = s[:, None], z[:, None]
    elif act_order == "static":
        scales, zeros = grouped_qparams(W, scheme, clip, importance)

    perm = None
    if act_order != "none":
        perm = torch.argsort(importance, descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        importance = importance[perm]
    if not per_channel and act_order != "static":
        G = scheme.num_groups(K)
        scales = torch.zeros(N, G, device=W.device)
        zeros = torch.zeros(N, G, device=W.device)

    Hinv, _ = _inverse_cholesky(H, damp, name)
    del H
    g_perm = torch.arange(K, device=W.device) // width
    if act_order == "static" and not per_channel:
        orig_groups = perm // width  # group (original order) of each permuted column
        col_scale, col_zero = scales[:, orig_groups], zeros[:, orig_groups]
    Q = torch.zeros(N, K, device=W.device)

    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            i = i1 + j
            w = W1[:, j]
            d = Hinv1[j, j]
            if per_channel:
                s, z = scales[:, 0], zeros[:, 0]
            elif act_order == "static":
                s, z = col_scale[:, i], col_zero[:, i]
            else:
                if i % width == 0:
                    # Group starting here: qparams from the updated weights of its columns;
                    # columns of later blocks have received the updates of earlier blocks only.
                    cols = torch.cat([W1[:, j : j + width], W[:, i2 : i + width]], dim=1)
                    imp = importance[i : i + cols.shape[1]]
                    g = i // width
                    scales[:, g], zeros[:, g] = find_qparams(cols, scheme, clip, imp)
                s, z = scales[:, i // width], zeros[:, i // width]
            q = quantize(w, s, z, scheme.maxq)
            Q1[:, j] = q
            err = (w - (q - z) * s) / d
            W1[:, j:] -= err[:, None] * Hinv1[j, j:][None, :]
            Err1[:, j] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        g_idx = g_perm[inv].cpu() if act_order == "dynamic" else scheme.default_g_idx(K)
    else:
        g_idx = scheme.default_g_idx(K)
    if per_channel:
        g_idx = torch.zeros(K, dtype=torch.int32)
    return QuantizedWeight(
        q=Q.to(torch.uint8),
        scales=scales.float().contiguous(),
        zeros=zeros.to(torch.int32).contiguous(),
        g_idx=g_idx.to(torch.int32),
        bits=scheme.bits,
        group_size=scheme.group_size,
        sym=scheme.sym,
    )


@dataclass(frozen=True)
class GPTQConfig(QuantArgs):
    """Arguments of the ``gptq`` recipe step (scheme and clipping as in ``QuantArgs``; the
    clipping search is on by default, weighted by the Hessian diagonal)."""

    clip: bool = True
    clip_norm: float = 2.0
    act_order: str = "static"
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act_order not in ACT_ORDERS:
            raise ValueError(
                f"act_order: {self.act_order!r} is not one of {', '.join(ACT_ORDERS)}"
            )
        if not 0 < self.damp < 1:
            raise ValueError(f"damp: {self.damp} must lie in (0, 1); the usual value is 0.01")
        if self.block_size < 1:
            raise ValueError(f"block_size: {self.block_size} must be a positive integer")
