"""AWQ (Lin et al., MLSys 2024, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration"): per input channel scales ``s`` moved from an operation onto
the Linears it feeds (``prev(x) / s`` and ``W * s``), so that the weights of channels with large
activations get finer quantization. The model computes the same function after the move; AWQ
only rescales and clips, and quantization follows with the shared scheme (RTN or GPTQ).

The pure functions come first; :class:`AWQ` is the block transform the walker runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llmc.core.scheme import QuantScheme, fake_quantize, grouped_qparams, qparams_from_range
from llmc.core.stats import HessianStats
from llmc.core.tree import first_tensor, map_tensors
from llmc.interfaces import BlockTransform
from llmc.methods.gptq import GPTQConfig, gptq_quantize
from llmc.models.scaling import ScalePair, apply_scales, expand_tied, head_tie, reduce_tied
from llmc.registry import METHODS

log = logging.getLogger(__name__)

SEARCH_QUANTIZERS = ("rtn", "gptq")
GPTQ_SEARCH_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class AWQConfig:
    """Arguments of the ``awq`` recipe step.

    ``bits``/``group_size``/``sym``: the scheme the scales are searched for; the quantizer step
    that follows in the recipe must use the same (without one, an ``rtn`` step with this scheme
    is added). ``grid`` exponents ``a`` in [0, 1) for ``s = x_mean^a`` (``duo_scaling``:
    ``x_mean^a / w_mean^(1-a)``). ``search_samples`` calibration windows (a seeded choice of
    whole chunks) feed the module-output search and the clipping search; ``x_mean`` uses every
    window. ``clip``: afterwards, search each group's clipping range (``clip_grid`` shrink steps
    down to ``1 - clip_max_shrink``) on the layer-output error, skipping q and k.

    ``search``: the quantizer the candidates are scored with. ``rtn`` scores the whole grid
    with round-to-nearest. ``gptq`` (set by the recipe when a ``gptq`` step follows) scores the
    RTN grid's winner ``a*`` again, and ``a* / 4, a* / 2, 3 a* / 4`` and the unscaled weights,
    with GPTQ (its default settings for this scheme) on the Hessian of the search tokens, and
    keeps the best: scales that help round-to-nearest can hurt GPTQ, which already moves
    rounding error away from the large input channels."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    grid: int = 20
    duo_scaling: bool = False
    search_samples: int = 4
    seed: int = 0
    clip: bool = True
    clip_grid: int = 100
    clip_max_shrink: float = 0.5
    search: str = "rtn"
    full_range: bool = False

    def __post_init__(self) -> None:
        QuantScheme(self.bits, self.group_size, self.sym, full_range=self.full_range)
        if self.search not in SEARCH_QUANTIZERS:
            raise ValueError(
                f"search: {self.search!r} is not one of {', '.join(SEARCH_QUANTIZERS)}"
            )
        if self.grid < 1:
            raise ValueError(f"grid: {self.grid} must be at least 1")
        if self.search_samples < 1:
            raise ValueError(f"search_samples: {self.search_samples} must be at least 1")
        if self.clip_grid < 1:
            raise ValueError(f"clip_grid: {self.clip_grid} must be at least 1")
        if not 0.0 <= self.clip_max_shrink < 1.0:
            raise ValueError(f"clip_max_shrink: {self.clip_max_shrink} must lie in [0, 1)")

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size, self.sym, full_range=self.full_range)


def group_abs_mean(weights: list[Tensor], scheme: QuantScheme) -> Tensor:
    """``w_mean`` of the duo form: |W| normalised by its group's maximum, averaged over every
    output row of ``weights`` (Linears sharing one input), per input channel."""
    out = []
    for W in weights:
        W = W.detach().float().abs()
        N, K = W.shape
        width = scheme.group_width(K)
        pad = (-K) % width
        Wp = torch.nn.functional.pad(W, (0, pad)).reshape(N, -1, width)
        Wp = Wp / (Wp.amax(dim=-1, keepdim=True) + 1e-6)
        out.append(Wp.reshape(N, -1)[:, :K])
    return torch.cat(out).mean(dim=0)


def normalize_scales(s: Tensor) -> Tensor:
    """Guard zero/inf/NaN (they become 1) and centre: ``s / sqrt(max(s) * min(s))``."""
    s = s.float()
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s)).clamp(min=1e-4, max=1e4)
    return s / (s.max() * s.min()).sqrt()


def candidate_scales(
    x_mean: Tensor, w_mean: Tensor | None, grid: int
) -> Iterator[tuple[float, Tensor]]:
    """``(a, s)`` for ``a = i / grid``, i in 0..grid-1 (``a = 0`` gives s = 1: plain RTN)."""
    for i in range(grid):
        yield i / grid, scales_at(i / grid, x_mean, w_mean)


def scales_at(a: float, x_mean: Tensor, w_mean: Tensor | None) -> Tensor:
    """``x_mean^a`` (duo: ``/ (w_mean^(1-a) + 1e-4)``), normalised."""
    s = x_mean.float().clamp(min=1e-8).pow(a)
    if w_mean is not None:
        s = s / (w_mean.float().pow(1 - a) + 1e-4)
    return normalize_scales(s)


def fake_quant_scaled(W: Tensor, s: Tensor, scheme: QuantScheme) -> Tensor:
    """``Q(W * s) / s``: the weight the scaled model effectively applies to unscaled inputs."""
    Ws = W.float() * s
    scales, zeros = grouped_qparams(Ws, scheme)
    g = scheme.default_g_idx(W.shape[1]).long()
    return fake_quantize(Ws, scales[:, g], zeros[:, g], scheme) / s


@dataclass
class ScaleSearch:
    """The chosen exponent, its scales and the loss of every candidate (``losses[0]`` is RTN)."""

    alpha: float
    scales: Tensor
    losses: list[float]


def search_scales(
    weights: list[Tensor],
    x_mean: Tensor,
    loss: Callable[[list[Tensor]], float],
    scheme: QuantScheme,
    grid: int = 20,
    duo: bool = True,
    tie: tuple[int, int] | None = None,
) -> ScaleSearch:
    """Grid search of ``s`` for Linears that share an input: ``loss`` gets their candidate
    weights ``Q(W * s) / s`` (float32, in the unscaled input space) and returns the output
    error; the smallest wins (``a = 0``, plain RTN, included).

    ``tie = (g, head_dim)`` ties the scales of each ``g`` consecutive heads (grouped-query
    attention: the query heads reading one KV head share v's output scale): ``x_mean`` and
    ``w_mean`` are averaged over the g heads and the chosen KV-sized scale is repeated.
    ``ScaleSearch.scales`` has the KV size then; :func:`expand_tied` gives the full one."""
    w_mean = group_abs_mean(weights, scheme) if duo else None
    xr, wr = reduce_tied(x_mean, tie), reduce_tied(w_mean, tie)
    return _pick(weights, candidate_scales(xr, wr, grid), loss,
                 lambda W, s: fake_quant_scaled(W, s, scheme), tie, torch.ones_like(xr.float()))


def _pick(
    weights: list[Tensor],
    candidates: Iterable[tuple[float, Tensor]],
    loss: Callable[[list[Tensor]], float],
    quantize: Callable[[Tensor, Tensor], Tensor],
    tie: tuple[int, int] | None,
    unscaled: Tensor,
) -> ScaleSearch:
    """Score each candidate ``(a, s)`` (``s`` KV-sized under ``tie``) by ``loss`` of every
    weight's ``quantize(W, s)``; the smallest wins. When every loss is NaN, the weights stay
    as they are (``unscaled``: ones, alpha 0)."""
    best_alpha, best_s, best_loss = 0.0, unscaled, float("inf")
    losses = []
    for a, s_small in candidates:
        s = expand_tied(s_small, tie)
        value = loss([quantize(W, s) for W in weights])
        losses.append(value)
        if value < best_loss:
            best_alpha, best_s, best_loss = a, s_small, value
    return ScaleSearch(best_alpha, best_s, losses)


def gptq_scaled(W: Tensor, s: Tensor, H: Tensor, scheme: QuantScheme) -> Tensor:
    """``GPTQ(W * s) / s`` on the Hessian of the scaled inputs ``H / (s s^T)``, with GPTQ's
    default settings (static act order, damping 0.01, clipping search)."""
    c = GPTQConfig(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym,
                   full_range=scheme.full_range)
    Hs = H.float() / (s[:, None] * s[None, :])
    qw = gptq_quantize(W.float() * s, Hs, scheme, act_order=c.act_order, damp=c.damp,
                       block_size=c.block_size, clip=c.clip_search)
    return qw.dequantize() / s


def refine_for_gptq(
    weights: list[Tensor],
    x_mean: Tensor,
    H: Tensor,
    loss: Callable[[list[Tensor]], float],
    scheme: QuantScheme,
    first: ScaleSearch,
    duo: bool = False,
    tie: tuple[int, int] | None = None,
) -> ScaleSearch:
    """Score the unscaled weights and the exponents ``f * first.alpha`` (f in
    ``GPTQ_SEARCH_FRACTIONS``) with GPTQ on ``H`` (the Hessian of the unscaled inputs) instead
    of RTN; the smallest ``loss`` wins (alpha 0 stands for the unscaled weights). ``losses``
    are the GPTQ losses in that order."""
    w_mean = group_abs_mean(weights, scheme) if duo else None
    xr, wr = reduce_tied(x_mean, tie), reduce_tied(w_mean, tie)
    ones = torch.ones_like(xr.float())
    alphas = {f * first.alpha for f in GPTQ_SEARCH_FRACTIONS}
    if not duo:
        alphas.discard(0.0)  # x_mean^0 is the unscaled candidate already
    candidates = [(0.0, ones)] + [(a, scales_at(a, xr, wr)) for a in sorted(alphas)]
    return _pick(weights, candidates, loss, lambda W, s: gptq_scaled(W, s, H, scheme), tie,
                 ones)


def hessian_loss(H: Tensor, originals: list[Tensor]) -> Callable[[list[Tensor]], float]:
    """``sum tr(dW H dW^T)``: the squared output error on the inputs that built ``H``."""
    H = H.float()

    def loss(candidates: list[Tensor]) -> float:
        total = 0.0
        for W, Wq in zip(originals, candidates):
            dW = Wq - W.float()
            total += float(((dW @ H) * dW).sum())
        return total

    return loss


def _clip_error(w: Tensor, Hg: Tensor, m: Tensor, scheme: QuantScheme) -> Tensor:
    """Per row: the output error ``dW Hg dW^T`` of ``w`` clamped to ``[-m, m]`` and quantized."""
    m = m[:, None]
    c = torch.maximum(torch.minimum(w, m), -m)
    s, z = qparams_from_range(c.amin(dim=1).clamp(max=0), c.amax(dim=1).clamp(min=0), scheme)
    dW = fake_quantize(c, s[:, None], z[:, None], scheme) - w
    return ((dW @ Hg) * dW).sum(dim=1)


def clip_weight(
    W: Tensor, H: Tensor, scheme: QuantScheme, grid: int = 100, max_shrink: float = 0.5,
    stride: int = 4,
) -> tuple[Tensor, Tensor]:
    """AWQ's clipping search: for each row and group, the range ``[-m, m]``, ``m`` a shrink of
    the group's max |w| on a grid (``1 - i / grid`` down to ``1 - max_shrink``), that minimises
    the group's output error ``dW_g H_gg dW_g^T`` (``H_gg``: the group's diagonal block of the
    input Hessian). Every ``stride``-th factor first, then each row's neighbours of its best.
    Returns the clamped weight and the chosen shrink factors [N, G]."""
    W = W.detach().float()
    N, K = W.shape
    width = scheme.group_width(K)
    steps = max(int(max_shrink * grid), 1)
    out = W.clone()
    factors = []
    for a in range(0, K, width):
        b = min(a + width, K)
        w = W[:, a:b]
        Hg = H[a:b, a:b].float()
        amax = w.abs().amax(dim=1)
        best = torch.full((N,), float("inf"), device=W.device)
        best_i = torch.zeros(N, dtype=torch.long, device=W.device)

        tries = [torch.full((N,), i, dtype=torch.long, device=W.device)
                 for i in range(0, steps, stride)]
        for fine in (False, True):
            if fine:  # the neighbours of each row's best coarse step
                tries = [(best_i + d).clamp(0, steps - 1) for k in range(1, stride)
                         for d in (-k, k)]
            for i in tries:
                err = _clip_error(w, Hg, amax * (1 - i.float() / grid), scheme)
                better = err < best
                best = torch.where(better, err, best)
                best_i = torch.where(better, i, best_i)
        p = 1 - best_i.float() / grid
        m = (amax * p)[:, None]
        out[:, a:b] = torch.maximum(torch.minimum(w, m), -m)
        factors.append(p)
    return out, torch.stack(factors, dim=1)


def search_windows(n_windows: int, samples: int, seed: int) -> list[int]:
    """A seeded choice of ``samples`` calibration windows (sorted)."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_windows, generator=g)[:samples].tolist())


def _rows(obj: Any, rows: Tensor, n: int) -> Any:
    """The ``rows`` of every tensor in ``obj`` whose first dimension is the batch ``n``."""
    return map_tensors(obj, lambda t: t[rows] if t.dim() > 0 and t.shape[0] == n else t)


def _in_expert(adapter: Any, pair: ScalePair) -> bool:
    return any(pair.linears[0].startswith(path + ".") for path in adapter.experts)


class AWQ(BlockTransform):
    """The ``awq`` recipe step: a block transform that searches and applies AWQ scales for
    every scaling pair of the architecture whose Linears the step targets, then clips."""

    needs_calibration = True
    # Over several processes: the input statistics and every candidate's loss are summed over
    # the ranks (windows and tokens drawn from all ranks' chunks as in one process), and rank
    # 0's choice of scales is every rank's.
    distributed = True

    def __init__(self, config: AWQConfig) -> None:
        self.config = config

    def check_model(self, config, adapter) -> None:
        adapter.check_scaling(config)

    def transform(self, ctx, step) -> dict:
        c = self.config
        scheme = c.scheme
        pairs = [p for p in ctx.adapter.scale_pairs
                 if any(step.selects(ctx.prefix + n) for n in p.linears)]
        if not pairs:
            return {}
        t0 = time.perf_counter()
        fwd = ctx.forward_copy()
        # Chunks are numbered among every rank's chunks (this rank's start at first_chunk), so
        # the search windows and token samples are those one process would draw.
        n_all = ctx.total_windows
        windows = search_windows(n_all, c.search_samples, c.seed)
        bs = ctx.batch_size
        n_chunks = ctx.total_chunks

        def chunk_windows(ch: int) -> int:
            return min(bs, n_all - ch * bs)

        rows_of = {}  # chunk -> rows of its search windows
        for w in windows:
            rows_of.setdefault(w // bs, []).append(w % bs)
        rows_of = {ch: torch.tensor(r) for ch, r in rows_of.items()}
        # Token-wise statistics (each pair's input Hessian, the MLP search) use as many tokens
        # as the search windows hold, drawn at random from every chunk.
        per_chunk = -(-c.search_samples * ctx.seqlen // n_chunks)
        gen = torch.Generator().manual_seed(c.seed)
        sel_of = {ch: torch.randperm(chunk_windows(ch) * ctx.seqlen,
                                     generator=gen)[:per_chunk].sort().values
                  for ch in range(n_chunks)}
        current = [-1]
        xsum = {p.prev: None for p in pairs}
        count = dict.fromkeys(xsum, 0)
        hess = {p.prev: HessianStats(fwd.get_submodule(p.linears[0]).in_features)
                for p in pairs}
        if ctx.exact_stats:
            for h in hess.values():
                h.make_exact()
        calls: dict[str, list] = {p.inspect: [] for p in pairs if p.inspect}
        tokenwise = {p.inspect for p in pairs if p.inspect and p.tokenwise}

        def input_hook(prev: str):
            def hook(module: nn.Module, inputs: tuple) -> None:
                x2 = inputs[0].detach().reshape(-1, inputs[0].shape[-1])  # [n * T, d]
                part = x2.abs().sum(dim=0, dtype=torch.float32)
                if ctx.exact_stats:  # each chunk's float32 sum added in float64
                    part = part.double()
                xsum[prev] = part if xsum[prev] is None else xsum[prev] + part
                count[prev] += x2.shape[0]
                if x2.shape[0] == chunk_windows(current[0]) * ctx.seqlen:
                    hess[prev].add_batch(x2[sel_of[current[0]]])
                else:  # an MoE expert's Linear: the rows routed to it, all of them
                    hess[prev].add_batch(x2)
            return hook

        def call_hook(name: str):
            def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if name in tokenwise:  # one input, any leading shape: a sample of its tokens
                    x = args[0] if args else next(iter(kwargs.values()))
                    calls[name].append([(x.reshape(-1, x.shape[-1])[sel_of[current[0]]],), {},
                                        None, current[0]])
                    return
                rows = rows_of.get(current[0])
                if rows is not None:
                    n = chunk_windows(current[0])
                    calls[name].append([_rows(args, rows, n), _rows(kwargs, rows, n), None,
                                        current[0]])

            def post(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
                # (a token-wise module's reference outputs are computed at search time)
                if name not in tokenwise and current[0] in rows_of:
                    calls[name][-1][2] = first_tensor(out).detach()[rows_of[current[0]]]
            return pre, post

        handles = []
        for p in pairs:
            handles.append(
                fwd.get_submodule(p.linears[0]).register_forward_pre_hook(input_hook(p.prev)))
        for name in calls:
            pre, post = call_hook(name)
            m = fwd.get_submodule(name)
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        tail = fwd.get_submodule(ctx.adapter.tail) if ctx.adapter.tail else None
        # Only the tail's inputs matter in this pass, not its outputs: skip its matmul.
        try:
            with ctx.replaced_forward(tail, lambda x: torch.zeros((), dtype=x.dtype)):
                ctx.forward(fwd, before=lambda i: current.__setitem__(0, ctx.first_chunk + i))
        finally:
            for h in handles:
                h.remove()
        if ctx.dist is not None:  # every rank holds chunks, so every sum has a part here
            for prev in xsum:
                xsum[prev] = ctx.dist.all_reduce(xsum[prev])
                count[prev] = ctx.dist.all_reduce_int(count[prev])
                hess[prev].reduce(ctx.dist)
        t_stats = time.perf_counter() - t0

        pair_records = []
        input_h: dict[str, Tensor] = {}  # Linear -> Hessian of its (scaled) inputs
        for p in pairs:
            if _in_expert(ctx.adapter, p) and count[p.prev] < ctx.min_tokens:
                # a starved expert: its few inputs would choose noise; it keeps its weights
                # unscaled (and the quantizer's own fallback applies)
                log.warning("block %d: %s -> %s saw %d calibration rows (fewer than "
                            "min_expert_tokens=%d): no AWQ scales", ctx.index, p.prev,
                            ", ".join(p.linears), count[p.prev], ctx.min_tokens)
                pair_records.append({"prev": p.prev, "linears": list(p.linears),
                                     "skipped": f"{count[p.prev]} calibration rows"})
                continue
            masters = [ctx.block.get_submodule(n) for n in p.linears]
            weights = [m.weight.data.float() for m in masters]
            x_mean = (xsum[p.prev] / max(count[p.prev], 1)).float()
            tie = head_tie(ctx.block, p)
            H = hess[p.prev].H
            if p.inspect:
                loss = self._module_loss(fwd, p, calls[p.inspect], ctx.dtype, n_chunks,
                                         ctx.dist)
            else:
                loss = hessian_loss(H, weights)
            with torch.no_grad():
                res = search_scales(weights, x_mean, loss, scheme, c.grid, c.duo_scaling, tie)
                rtn = res
                if c.search == "gptq":
                    res = refine_for_gptq(weights, x_mean, H, loss, scheme, rtn,
                                          c.duo_scaling, tie)
            if p.inspect:  # the copy's Linears back to their unquantized weights
                for n, W in zip(p.linears, weights):
                    fwd.get_submodule(n).weight.data.copy_(W)
            scales = res.scales
            if ctx.dist is not None:  # rank 0's choice (the ranks' sums agree; this makes sure)
                scales = ctx.dist.broadcast(scales.contiguous().clone(), 0)
            s_in = apply_scales(ctx.block, p, scales, ctx.adapter.norm_offset, tie)
            Hs = H / (s_in[:, None] * s_in[None, :])
            for n in p.linears:
                input_h[n] = Hs
            pair_records.append({
                "prev": p.prev, "linears": list(p.linears), "alpha": res.alpha,
                "loss": min(rtn.losses), "loss_rtn": rtn.losses[0], "tied_heads": tie is not None,
                **({"alpha_rtn": rtn.alpha, "loss_gptq": min(res.losses),
                    "loss_gptq_unscaled": res.losses[0]} if res is not rtn else {}),
            })
        t_clip = time.perf_counter()
        clipped = {}
        if c.clip:
            for p in pairs:
                for n in p.linears:
                    if n in ctx.adapter.no_clip or not step.selects(ctx.prefix + n) \
                            or n not in input_h:  # (a skipped pair: a starved expert)
                        continue
                    m = ctx.block.get_submodule(n)
                    W, factors = clip_weight(m.weight.data, input_h[n], scheme, c.clip_grid,
                                             c.clip_max_shrink)
                    m.weight.data.copy_(W)
                    clipped[n] = float(factors.mean())
        return {
            "pairs": pair_records,
            "clip_mean_factor": clipped,
            "search_windows": windows,
            "search_tokens": sum(len(v) for v in sel_of.values()),
            "stats_seconds": t_stats,
            "clip_seconds": time.perf_counter() - t_clip,
            "seconds": time.perf_counter() - t0,
        }

    @staticmethod
    def _module_loss(fwd: nn.Module, pair, calls: list, dtype: torch.dtype, n_chunks: int,
                     dist: Any = None):
        """Squared error of ``pair.inspect``'s output on the search windows, its Linears set to
        the candidate weights (in the forward dtype): summed per chunk, over the ranks when
        ``dist`` is given, then over the chunks in order (the same sum on any split)."""
        module = fwd.get_submodule(pair.inspect)
        linears = [fwd.get_submodule(n) for n in pair.linears]

        with torch.no_grad():
            for call in calls:
                if call[2] is None:  # reference outputs on the unquantized weights
                    call[2] = first_tensor(module(*call[0], **call[1])).detach()

        def loss(candidates: list[Tensor]) -> float:
            for m, W in zip(linears, candidates):
                m.weight.data.copy_(W.to(dtype))
            per_chunk = torch.zeros(n_chunks, dtype=torch.float64)
            for args, kwargs, ref, chunk in calls:
                out = first_tensor(module(*args, **kwargs))
                per_chunk[chunk] += float((out.float() - ref.float()).pow(2).sum())
            if dist is not None:
                dist.all_reduce(per_chunk)
            return sum(per_chunk.tolist())

        return loss


METHODS.register("awq", AWQConfig, AWQ,
                 "AWQ activation-aware scales, then clipping (Lin et al. 2024); a quantizer step "
                 "follows (rtn when the recipe has none)", role="transform")
