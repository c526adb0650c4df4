"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a Linear's weight column by column, spreading each column's
rounding error over the columns not yet quantized with the inverse Hessian ``H = 2 X^T X`` of
the layer's inputs (Algorithm 1, with lazy batch updates and a Cholesky form of ``H^-1``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.core.masks import smallest_mask
from llmc.core.scheme import (
    ClipSearch,
    QuantArgs,
    QuantizedWeight,
    QuantScheme,
    block_qparams,
    find_qparams,
    grouped_qparams,
    output_error,
    quantize,
)
from llmc.core.stats import HessianStats, consumed, require_inputs
from llmc.interfaces import CompressResult, LinearCompressor, Stats
from llmc.methods.rtn import rtn_compress
from llmc.registry import METHODS

log = logging.getLogger(__name__)

ACT_ORDERS = ("none", "static", "dynamic")


def _inverse_cholesky(prepared: Callable[[], Tensor], damp: float,
                      name: str) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, ``H = prepared()`` (a
    private copy); one retry at 10x damp. ``H`` is damped in place (its diagonal restored
    exactly for the retry) and dropped once factored, so that no more than two K x K matrices
    are alive at once (for an 11008-wide input: 0.97 GB rather than 2.4)."""
    H: Tensor | None = prepared()
    if not torch.isfinite(H).all():
        raise ValueError(
            f"{name}: the Hessian has inf/NaN entries (activations overflowed); calibrate with "
            "walker dtype float32 (--dtype float32)"
        )
    original = H.diagonal().clone()
    mean_diag = torch.mean(original).item()
    for attempt, d in enumerate((damp, damp * 10)):
        if H is None:  # the inverse of the last try failed after H was dropped
            H = prepared()
        H.diagonal().copy_(original).add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            H = None
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info.item() == 0:
                if attempt:
                    log.warning("%s: Hessian not positive definite; used damp=%g", name, d)
                return U, d
    raise ValueError(
        f"{name}: the Hessian is not positive definite even with damp={damp * 10:g}; "
        "raise `damp` (e.g. 0.1) or use more calibration samples"
    )


@dataclass(frozen=True)
class PruneRule:
    """What the OBS loop prunes while it walks the columns: a ``sparsity`` fraction of each
    block of columns (``scope`` ``row``: of every row; ``layer``: of the block's entries
    together), or, with ``m > 0``, all but ``n`` of every ``m`` consecutive columns of a row,
    chosen when the loop reaches them. Entries are ranked by ``w^2 / [H^-1]_jj^2``, the OBS
    saliency on the updated weights (SparseGPT)."""

    sparsity: float = 0.0
    n: int = 0
    m: int = 0
    scope: str = "row"


def _block_count(total: int, sparsity: float, i1: int, i2: int) -> int:
    """Entries to prune among positions [i1, i2) of ``total``: the difference of the rounded
    cumulative targets, so the counts of all blocks add up to ``round(sparsity * total)``."""
    return round(sparsity * i2) - round(sparsity * i1)


def obs_compress(
    W: Tensor,
    H: Tensor,
    scheme: QuantScheme | None,
    *,
    prune: PruneRule | None = None,
    keep: Tensor | None = None,
    act_order: str = "static",
    damp: float = 0.01,
    block_size: int = 128,
    clip: ClipSearch | None = None,
    name: str = "linear",
    factors: dict | None = None,
) -> tuple[Tensor, QuantizedWeight | None, Tensor | None]:
    """The column loop shared by GPTQ and SparseGPT (both Optimal Brain Surgeon updates with
    the upper Cholesky factor of ``H^-1``, lazily applied per block of ``block_size`` columns).

    Each column is quantized with ``scheme`` (None: kept as is) and/or pruned by ``prune``
    (SparseGPT: the chosen entries become 0 and their value is spread over the later columns);
    the error goes to the columns not yet visited. ``keep`` ([N, K] bool) is a fixed mask of an
    earlier pruning step: its zeros stay exactly zero and take no updates (an update landing on
    one is dropped when the loop reaches it), and their codes are the zero point, so they
    dequantize to exactly 0. Returns the new dense weight, its integer form when quantizing,
    and the pruned entries (True) when pruning.

    act_order (quantizing only): ``none`` keeps the column order, each group's qparams computed
    when the loop reaches it (on the updated weights); ``static`` computes every group's qparams
    up front from the original weights in the original order (``g_idx = k // group_size``) and
    then processes columns by descending ``diag(H)``; ``dynamic`` processes columns by
    descending ``diag(H)`` and computes each group's qparams at its first permuted column on
    the updated weights (``g_idx[perm[i]] = i // group_size``). Pruning walks the columns in
    their order (N:M groups are consecutive columns), so it needs ``none``. Inputs with
    ``diag(H) == 0`` (dead) get ``H = 1`` there and their weight column zeroed. ``clip``
    searches each group's clipping range, weighted by ``diag(H)``. ``factors`` (the
    statistics' :attr:`HessianStats.factors`) keeps the factor of ``H^-1`` for the next Linear
    that reads the same input (q, k, v): one Cholesky per group rather than per Linear.
    """
    if act_order not in ACT_ORDERS:
        raise ValueError(f"act_order: {act_order!r} is not one of {', '.join(ACT_ORDERS)}")
    if prune is not None and act_order != "none" and scheme is not None:
        raise ValueError("pruning walks the columns in order: use act_order 'none'")
    W = W.detach().float().clone()
    if scheme is not None:
        scheme = scheme.for_weight(W)  # NVFP4: the global scale, from the original weight
    H_in = H.detach().float().to(W.device)  # the caller's (the statistics keep it anyway)
    del H
    N, K = W.shape
    quantizing = scheme is not None
    if keep is not None:
        keep = keep.to(W.device, torch.bool)
        W = W * keep
    if prune is not None and prune.m:
        block_size = max(block_size - block_size % prune.m, prune.m)

    dead = torch.diag(H_in) == 0
    W[:, dead] = 0
    importance = torch.diag(H_in).clone()
    importance[dead] = 1

    if quantizing:
        width = scheme.group_width(K)
        per_channel = scheme.group_size == -1
        if per_channel:
            s, z = find_qparams(W, scheme, clip, importance)
            scales, zeros = s[:, None], z[:, None]
        elif act_order == "static":
            scales, zeros = grouped_qparams(W, scheme, clip, importance)
    else:
        act_order = "none"

    perm = None
    if act_order != "none":
        perm = torch.argsort(importance, descending=True)
        W = W[:, perm]
        importance = importance[perm]
        if keep is not None:
            keep = keep[:, perm]
    if quantizing:
        if not per_channel and act_order != "static":
            G = scheme.num_groups(K)
            scales = torch.zeros(N, G, device=W.device)
            zeros = torch.zeros(N, G, device=W.device)
        g_perm = torch.arange(K, device=W.device) // width
        if act_order == "static" and not per_channel:
            orig_groups = perm // width  # group (original order) of each permuted column
            col_scale, col_zero = scales[:, orig_groups], zeros[:, orig_groups]

    source = [H_in]  # dropped once H^-1 is known (a device copy would otherwise stay)
    del H_in

    def prepared() -> Tensor:
        """A private copy of H with dead inputs set to 1, in the loop's column order."""
        H = source[0][perm[:, None], perm] if perm is not None else source[0].clone()
        d = dead[perm] if perm is not None else dead
        H[d, d] = 1
        return H

    key = ("none" if perm is None else "by diag(H)", damp)
    Hinv = factors.get(key) if factors is not None else None
    if Hinv is None:
        Hinv, _ = _inverse_cholesky(prepared, damp, name)
        if factors is not None:
            factors[key] = Hinv
    source.clear()
    Q = torch.zeros(N, K, device=W.device)  # codes when quantizing, else the new weights
    pruned = torch.zeros(N, K, dtype=torch.bool, device=W.device) if prune is not None else None

    # The loop works on each block transposed ([columns, N]), so that a column is a contiguous
    # row: on a CPU this is many times faster than strided columns, and every element sees the
    # same arithmetic (the same products and differences), so the result is identical.
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].t().contiguous()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        keep1 = keep[:, i1:i2].t().contiguous() if keep is not None else None
        if quantizing and act_order == "static" and not per_channel:
            cs1 = col_scale[:, i1:i2].t().contiguous()
            cz1 = col_zero[:, i1:i2].t().contiguous()
        if prune is not None:
            diag1 = torch.diag(Hinv1)
            if prune.m:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            else:
                rows = 1 if prune.scope == "row" else N
                count = _block_count(K * rows, prune.sparsity, i1 * rows, i2 * rows)
                mask1 = smallest_mask(W1.t().contiguous() ** 2 / diag1**2, count,
                                      prune.scope).t().contiguous()
        for j in range(i2 - i1):
            i = i1 + j
            w = W1[j]
            d = Hinv1[j, j]
            if prune is not None and prune.m and j % prune.m == 0:
                tmp = W1[j : j + prune.m].t().contiguous() ** 2 / diag1[j : j + prune.m] ** 2
                mask1[j : j + prune.m] = smallest_mask(tmp, prune.m - prune.n, "row").t()
            if keep1 is not None:
                w = w * keep1[j]
            if quantizing:
                if per_channel:
                    s, z = scales[:, 0], zeros[:, 0]
                elif act_order == "static":
                    s, z = cs1[j], cz1[j]
                else:
                    if i % width == 0:
                        # Group starting here: qparams from the updated weights of its columns;
                        # columns of later blocks have received the updates of earlier blocks
                        # only. Fixed zeros and entries already pruned do not count.
                        cols = torch.cat([W1[j : j + width].t(), W[:, i2 : i + width]], dim=1)
                        if keep is not None:
                            cols = cols * keep[:, i : i + cols.shape[1]]
                        if prune is not None:
                            cols = cols.clone()
                            cols[:, : i2 - i].masked_fill_(mask1[j : j + width].t(), 0)
                        imp = importance[i : i + cols.shape[1]]
                        g = i // width
                        scales[:, g], zeros[:, g] = block_qparams(
                            *find_qparams(cols, scheme, clip, imp), scheme)
                    s, z = scales[:, i // width], zeros[:, i // width]
                q = quantize(w, s, z, scheme)
                if prune is not None:
                    q = torch.where(mask1[j], z, q)
                if keep1 is not None:
                    q = torch.where(keep1[j], q, z)
                Q1[j] = q
                err = (w - (q - z) * s) / d
            else:
                q = w.masked_fill(mask1[j], 0) if prune is not None else w
                Q1[j] = q
                err = (w - q) / d
            W1[j:] -= Hinv1[j, j:][:, None] * err[None, :]
            Err1[j] = err
        Q[:, i1:i2] = Q1.t()
        if prune is not None:
            pruned[:, i1:i2] = mask1.t()
        W[:, i2:] -= Err1.t().contiguous() @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm) if perm is not None else None
    if inv is not None:
        Q = Q[:, inv]
    if not quantizing:
        return Q, None, pruned
    if per_channel:
        g_idx = torch.zeros(K, dtype=torch.int32)
    elif act_order == "dynamic":
        g_idx = g_perm[inv].cpu()
    else:
        g_idx = scheme.default_g_idx(K)
    qw = QuantizedWeight(
        q=Q.to(scheme.code_dtype),
        scales=scales.float().contiguous(),
        zeros=zeros.to(torch.int32).contiguous(),
        g_idx=g_idx.to(torch.int32),
        bits=scheme.bits,
        group_size=scheme.group_size,
        sym=scheme.sym,
        type=scheme.type,
        global_scale=scheme.global_scale,
        block_rows=scheme.block_rows,
    )
    return qw.dequantize(), qw, pruned


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    scheme: QuantScheme,
    *,
    act_order: str = "static",
    damp: float = 0.01,
    block_size: int = 128,
    clip: ClipSearch | None = None,
    keep: Tensor | None = None,
    name: str = "linear",
    factors: dict | None = None,
) -> QuantizedWeight:
    """Quantize ``W`` ([N, K]) against the Hessian ``H`` ([K, K]) of its inputs (GPTQ): see
    :func:`obs_compress` for ``act_order``, ``clip``, a fixed sparsity mask ``keep`` and
    ``factors``."""
    _, qw, _ = obs_compress(W, H, scheme, keep=keep, act_order=act_order, damp=damp,
                            block_size=block_size, clip=clip, name=name, factors=factors)
    assert qw is not None
    return qw


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


class GPTQ(LinearCompressor):
    """GPTQ on the Hessian of each Linear's calibration inputs."""

    needs_calibration = True
    stats_kind = "hessian"

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config
        self.sequential = config.true_sequential

    def new_stats(self, in_features: int) -> HessianStats:
        return HessianStats(in_features)

    def compress(self, name: str, weight: Tensor, stats: Stats | None,
                 mask: Tensor | None = None) -> CompressResult:
        require_inputs(name, stats)
        c = self.config
        t = time.perf_counter()
        qw = gptq_quantize(
            weight, stats.H, c.scheme, act_order=c.act_order, damp=c.damp,
            block_size=c.block_size, clip=c.clip_search, keep=mask, name=name,
            factors=getattr(stats, "factors", None),
        )
        consumed(stats)
        W = qw.dequantize()
        err = output_error(weight, W, stats.H)
        return CompressResult(W, qw, err, time.perf_counter() - t)

    def compress_without_data(self, name: str, weight: Tensor,
                              mask: Tensor | None = None) -> CompressResult:
        """The fallback for a Linear whose statistics are too thin (a starved MoE expert):
        RTN on the same scheme."""
        t = time.perf_counter()
        qw, W = rtn_compress(weight, self.config.scheme, self.config.clip_search)
        return CompressResult(W, qw, None, time.perf_counter() - t, info={"fallback": "rtn"})


METHODS.register("gptq", GPTQConfig, GPTQ, "GPTQ weight quantization (Frantar et al. 2022)",
                 role="quantizer")
