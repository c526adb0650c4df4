"""SignRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the
Quantization of LLMs", 2023; the method of AutoRound): learned rounding, block by block.

Each targeted Linear's weight ``W`` is put on its grid as

    q = clamp(round(W / s + v + d) + z, 0, 2^bits - 1),    W' = (q - z) * s

with a learned offset ``v`` in [-0.5, 0.5] per weight (which way it rounds), and learned
factors on each group's range (``s`` from ``amax * a`` when symmetric, from ``[min * b,
max * a]`` when not, ``a, b`` in [``min_range``, 1]). ``d`` is 0 when learning starts from
round-to-nearest (``init: rtn``); with ``init: gptq`` it holds GPTQ's codes as integer offsets
from nearest, and the range factors GPTQ's clipping, so that learning refines GPTQ's answer.
Rounding passes gradients straight through; scales are rounded to fp16 (what the writers store)
the same way.

The loss is the block's output error (relative MSE) against the uncompressed block: the
compressed block runs on the compressed model's hidden states, the targets are the uncompressed
block on the uncompressed model's hidden states (``target: uncompressed``, AutoRound's default)
or on the same compressed inputs (``target: compressed``). Each step takes one chunk of
calibration windows; every parameter moves by ``lr`` times the sign of its gradient, ``lr``
decaying linearly to 0 over the steps. The last ``heldout`` windows are never trained on; they
pick the best step (0 included: never worse than the start).

A training step can take its loss on a random sample of the chunk's tokens (``tokens``, a
fraction): the block's token-wise part (the MLP, as the model's structure found it: permuting
its input tokens permutes its outputs) then runs on those tokens only, and attention on all of
them, so the loss at the sampled positions is exact. The MLP holds most of a block's weights:
with a quarter of the tokens a step takes about two thirds of the time. Checked once per block:
when the sampled outputs differ from the full block's (a block that mixes tokens after its
MLP), the step falls back to every token and the report says so. Held-out losses use every
token.

Pruned weights stay exactly zero (the keep mask multiplies ``W'``; 0 is on every integer grid).
After AWQ the block's weights are already rescaled; the walker hands them over as they are.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmc.core.scheme import QuantArgs, QuantScheme, QuantState, find_qparams
from llmc.core.stats import HessianStats
from llmc.interfaces import TRANSFORM, BlockContext, BlockTransform
from llmc.methods.distill.block import Chunks, share_tensors, teacher_outputs
from llmc.methods.distill.constraints import Best, _ste, keep_mask
from llmc.methods.distill.losses import relative_mse
from llmc.methods.gptq import ACT_ORDERS, gptq_quantize
from llmc.models import block_linears
from llmc.registry import METHODS

log = logging.getLogger(__name__)

PRESETS = {"fast": 50, "default": 200, "best": 500}  # signed-gradient steps per block
SAMPLES = {"fast": 1.0, "default": 1.0, "best": 1.0}  # the fraction of tokens a step's loss takes
INITS = ("rtn", "gptq")
TARGETS = ("uncompressed", "compressed")


@dataclass(frozen=True)
class SignRoundConfig(QuantArgs):
    """Arguments of the ``signround`` recipe step: the integer scheme (``bits``, ``group_size``,
    ``sym``; ``clip`` starts the range factors from the clipping search), ``preset`` (``fast``
    50, ``default`` 200, ``best`` 500 steps per block) or ``iters``, ``lr`` (0: 1 / steps),
    ``init`` (``rtn`` or ``gptq``), ``target`` (see the module), ``tokens`` (the fraction of a
    chunk's tokens a step's loss is taken on, the MLP run on those only; 0: the preset's),
    ``min_range`` (the smallest range factor), ``heldout`` windows that choose the best step,
    checked every ``eval_every`` steps; ``damp`` and ``act_order``: GPTQ's, for
    ``init: gptq``."""

    preset: str = "default"
    iters: int = 0
    tokens: float = 0.0
    lr: float = 0.0
    init: str = "rtn"
    target: str = "uncompressed"
    learn_range: bool = True
    min_range: float = 0.5
    heldout: int = 8
    eval_every: int = 10
    seed: int = 0
    damp: float = 0.01
    act_order: str = "static"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.type != "int":
            raise ValueError("signround learns integer rounding; for FP8 or NVFP4 weights use "
                             "gptq or rtn")
        if self.act_bits != 16:
            raise ValueError("signround quantizes weights only; drop act_bits (for 8-bit "
                             "activations use gptq, after smoothquant)")
        if self.preset not in PRESETS:
            raise ValueError(f"preset: {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.iters < 0:
            raise ValueError(f"iters: {self.iters} must be positive (0: the preset's)")
        if not 0 <= self.tokens <= 1:
            raise ValueError(f"tokens: {self.tokens} is a fraction of each chunk's tokens, in "
                             "(0, 1] (0: the preset's)")
        if self.lr < 0:
            raise ValueError(f"lr: {self.lr} must be positive (0: 1 / iters)")
        if self.init not in INITS:
            raise ValueError(f"init: {self.init!r} is not one of {', '.join(INITS)}")
        if self.target not in TARGETS:
            raise ValueError(f"target: {self.target!r} is not one of {', '.join(TARGETS)}")
        if not 0 < self.min_range <= 1:
            raise ValueError(f"min_range: {self.min_range} must lie in (0, 1]")
        if self.heldout < 1 or self.eval_every < 1:
            raise ValueError("heldout and eval_every must be at least 1")
        if self.act_order not in ACT_ORDERS:
            raise ValueError(f"act_order: {self.act_order!r} is not one of "
                             f"{', '.join(ACT_ORDERS)}")

    @property
    def steps(self) -> int:
        return self.iters or PRESETS[self.preset]

    @property
    def token_fraction(self) -> float:
        return self.tokens or SAMPLES[self.preset]

    @property
    def step_lr(self) -> float:
        return self.lr or 1.0 / self.steps


class LearnedGrid(nn.Module):
    """A weight ``W`` [N, K] and the parameters of its rounding: ``forward()`` is the weight on
    its grid, differentiable in the offsets ``v`` and the range factors (see the module).
    Columns are viewed as [N, G, width] groups, a narrow last group padded with zeros (which
    change no group's range and are cut off again)."""

    def __init__(self, W: Tensor, scheme: QuantScheme, mask: Tensor | None,
                 min_range: float, learn_range: bool, clip: Any = None) -> None:
        super().__init__()
        N, K = W.shape
        self.K, self.scheme, self.min_range = K, scheme, min_range
        width = scheme.group_width(K)
        G = -(-K // width)
        Wg = F.pad(W.detach().float(), (0, G * width - K)).reshape(N, G, width)
        self.register_buffer("W", Wg)
        self.register_buffer("mask", None if mask is None else mask.to(torch.bool))
        lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
        # full range: the scale's sign, from the side of the largest magnitude
        self.register_buffer("sign", torch.where(hi < lo.abs(), 1.0, -1.0)
                             if scheme.full_range else None)
        if scheme.sym:
            amax = torch.maximum(lo.abs(), hi)
            hi = torch.where(amax == 0, torch.ones_like(amax), amax)
            lo = -hi
        else:
            flat = (lo == 0) & (hi == 0)
            lo, hi = torch.where(flat, -torch.ones_like(lo), lo), torch.where(
                flat, torch.ones_like(hi), hi)
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)
        self.register_buffer("d", torch.zeros_like(Wg, dtype=torch.int8))
        self.v = nn.Parameter(torch.zeros_like(Wg))
        start = torch.ones_like(hi)
        if clip is not None:  # the clipping search's shrink factor as the starting range
            s, _ = find_qparams(Wg, scheme, clip)
            start = self._factor(s)
        self.a = nn.Parameter(start.clone(), requires_grad=learn_range)
        self.b = nn.Parameter(start.clone(), requires_grad=learn_range and not scheme.sym)

    def _span(self) -> Tensor:
        """The grid's width in steps: ``2^bits - 1``, or with the full range ``2^bits``
        (the largest magnitude on the long end, ``-2^(bits-1)``)."""
        return self.scheme.maxq + 1 if self.sign is not None else self.scheme.maxq

    def _factor(self, scale: Tensor) -> Tensor:
        """The range factor that gives (about) ``scale``."""
        full = (self.hi - self.lo) / self._span()
        return (scale.abs() / full).clamp(self.min_range, 1.0)

    def params(self) -> list[Tensor]:
        return [p for p in (self.v, self.a, self.b) if p.requires_grad]

    def qparams(self) -> tuple[Tensor, Tensor]:
        """Scales (fp16-rounded, straight through) and zero points [N, G]."""
        maxq = self.scheme.maxq
        hi = self.hi * self.a
        lo = -hi if self.scheme.sym else self.lo * self.b
        s = (hi - lo) / self._span()
        if self.scheme.sym:
            z = torch.full_like(s, (maxq + 1) // 2)
            if self.sign is not None:
                s = s * self.sign
        else:  # from the scale before its fp16 rounding, as qparams_from_range
            z = (-lo / s).clamp(0, maxq)
            z = _ste(z, torch.round(z))
        s = torch.copysign(s.abs().clamp(min=2**-24), s)
        return _ste(s, s.half().float()), z

    @torch.no_grad()
    def offsets(self) -> Tensor:
        """``q - z`` [N, G, width] as int8, for comparing two states."""
        q, _, z = self.codes()
        return (q - z[..., None]).to(torch.int8)

    def codes(self) -> tuple[Tensor, Tensor, Tensor]:
        """Codes [N, G, width] (float) and the qparams."""
        s, z = self.qparams()
        x = self.W / s[..., None] + self.v + self.d
        q = (_ste(x, torch.round(x)) + z[..., None]).clamp(0, self.scheme.maxq)
        return q, s, z

    def forward(self) -> Tensor:
        q, s, z = self.codes()
        W = ((q - z[..., None]) * s[..., None]).flatten(1)[:, : self.K]
        return W * self.mask if self.mask is not None else W

    def start_from(self, qw: Any) -> None:
        """Start from given codes and scales (GPTQ's): range factors for its scales, integer
        offsets ``d`` for its codes."""
        with torch.no_grad():
            scales = qw.scales.float()
            self.a.copy_(self._factor(scales))
            self.b.copy_(self.a)
            s, z = self.qparams()
            G, width = self.W.shape[1:]
            q = F.pad(qw.q.float() - qw.zeros.float()[:, qw.g_idx.long()],
                      (0, G * width - self.K)).reshape(self.W.shape)
            self.d.copy_((q - torch.round(self.W / s[..., None])).clamp(-127, 127))

    def final(self) -> tuple[Tensor, QuantState]:
        """The weight on its grid and its qparams, as a quantizer leaves a Linear."""
        with torch.no_grad():
            W = self.forward()
            s, z = self.qparams()
        sc = self.scheme
        state = QuantState(s.contiguous(), z.to(torch.int32).contiguous(),
                           sc.default_g_idx(self.K), sc.bits, sc.group_size, sc.sym)
        return W.contiguous(), state

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.a.clamp_(self.min_range, 1.0)
        self.b.clamp_(self.min_range, 1.0)


@contextlib.contextmanager
def _on_grids(linears: dict[str, nn.Linear], grids: dict[str, LearnedGrid]):
    """Each Linear computes with its learned grid's weight instead of its own."""
    with contextlib.ExitStack() as stack:
        for n, m in linears.items():
            g = grids[n]
            stack.enter_context(BlockContext.replaced_forward(
                m, lambda x, m=m, g=g: F.linear(x, g(), m.bias)))
        yield


def _tokenwise_parts(ctx: BlockContext) -> list[nn.Module]:
    """The block's outermost token-wise modules (its MLP), as the structure found them."""
    names = {p.inspect for p in getattr(ctx.adapter, "scale_pairs", ()) if p.inspect and
             p.tokenwise}
    outer = sorted(n for n in names if not any(n.startswith(o + ".") for o in names))
    return [ctx.block.get_submodule(n) for n in outer]


@contextlib.contextmanager
def _on_tokens(parts: list[nn.Module], sel: Tensor):
    """Each token-wise module computes on the tokens ``sel`` (flat indices into its input's
    leading dimensions) only; the other positions of its output are 0."""
    def sampled(orig):
        def forward(*a: Any, **kw: Any) -> Tensor:
            if a:
                x = a[0]
                y = orig(x.reshape(-1, x.shape[-1])[sel], *a[1:], **kw)
            else:  # its input passed by keyword: the first tensor
                key = next(k for k, v in kw.items() if isinstance(v, Tensor))
                x = kw[key]
                y = orig(**{**kw, key: x.reshape(-1, x.shape[-1])[sel]})
            if not isinstance(y, Tensor):
                raise _NotTokenwise(f"it returns a {type(y).__name__}, not a tensor")
            out = y.new_zeros(x.shape[:-1].numel(), y.shape[-1]).index_copy(0, sel, y)
            return out.reshape(*x.shape[:-1], y.shape[-1])
        return forward

    with contextlib.ExitStack() as stack:
        for m in parts:
            stack.enter_context(BlockContext.replaced_forward(m, sampled(m.forward)))
        yield


class _NotTokenwise(Exception):
    pass


def _rows(t: Tensor, sel: Tensor | None) -> Tensor:
    """The rows ``sel`` of ``t`` [n, T, d] flattened to [n * T, d] (all of them for None)."""
    return t if sel is None else t.reshape(-1, t.shape[-1])[sel]


@torch.no_grad()
def _sampling_refused(output: Callable[[int, Tensor | None], Tensor], c: int,
                      sel: Tensor) -> str | None:
    """Why chunk ``c``'s output at the tokens ``sel`` is not the full block's there (None:
    it is, to 1e-4 relative)."""
    try:
        part = output(c, sel)
    except Exception as e:  # noqa: BLE001 (whatever it raises, it cannot run on a sample)
        return f"its token-wise part cannot run on a sample: {type(e).__name__}: {e}"
    full = _rows(output(c, None), sel)
    err = float((part - full).abs().max() / full.abs().max().clamp(min=1e-12))
    return f"the block's output at sampled tokens differs by {err:.1e}" if err > 1e-4 else None


def _hessians(ctx: BlockContext, linears: dict[str, nn.Linear], chunks: list[int],
              args32: Any) -> dict[str, Tensor]:
    """Each Linear's input Hessian over ``chunks`` (this rank's), from the block as it is
    (GPTQ's start); summed over the ranks when the walk runs over several processes."""
    stats = {n: HessianStats(m.in_features) for n, m in linears.items()}
    if ctx.exact_stats:
        for st in stats.values():
            st.make_exact()
    handles = [m.register_forward_pre_hook(lambda _m, inp, n=n: stats[n].add_batch(inp[0]))
               for n, m in linears.items()]
    try:
        with torch.no_grad():
            for c in chunks:
                ctx.run(ctx.block, c, ctx.inputs(c, torch.float32), args32)
    finally:
        for h in handles:
            h.remove()
    if ctx.dist is not None:
        for st in stats.values():
            st.reduce(ctx.dist)
    return {n: st.H for n, st in stats.items()}


def _gptq_start(ctx: BlockContext, linears: dict[str, nn.Linear],
                grids: dict[str, LearnedGrid], train: list[int], cfg: Any,
                args32: Any) -> None:
    """GPTQ's codes and scales as every grid's start. Over several processes each Linear is
    solved by one owner rank (balanced by K^2 N), which sends the grid's start to the others."""
    dist = ctx.dist
    H = _hessians(ctx, linears, train, args32)
    owner = None if dist is None else dist.owners(
        {n: float(m.in_features) ** 2 * m.out_features for n, m in linears.items()})
    for n, m in linears.items():
        h = H.pop(n)
        if owner is None or owner[n] == dist.rank:
            qw = gptq_quantize(m.weight.data, h, cfg.scheme, act_order=cfg.act_order,
                               damp=cfg.damp, clip=cfg.clip_search, keep=keep_mask(m),
                               name=ctx.prefix + n)
            grids[n].start_from(qw)
        del h
    if owner is not None:
        for n in linears:
            _share_grid(dist, grids[n], owner[n])


def _share_grid(dist: Any, grid: LearnedGrid, src: int) -> None:
    """Rank ``src``'s rounding state of ``grid`` on every rank."""
    state = {"v": grid.v.data, "a": grid.a.data, "b": grid.b.data, "d": grid.d}
    got, _ = dist.broadcast_tensors(state if dist.rank == src else None, None, src=src)
    if dist.rank != src:
        with torch.no_grad():
            for k, t in state.items():
                t.copy_(got[k].to(t.device))


def _sign_step(params: list[Tensor], signs: list[Tensor] | None, src: int, dist: Any,
               rate: float) -> None:
    """One signed gradient step over every parameter, with the signs rank ``src`` computed
    (sent as one byte each; all of them in one process)."""
    signs = share_tensors(dist, params, signs, src, torch.int8)
    with torch.no_grad():
        torch._foreach_add_(params, signs, alpha=-rate)


def signround_block(ctx: BlockContext, step: Any, cfg: SignRoundConfig) -> dict[str, Any]:
    """Learn the rounding of the targeted Linears of ``ctx.block`` (float32 masters), leave
    them on their grids with their qparams, and write the block's outputs to the cache."""
    t0 = time.perf_counter()
    block, scheme = ctx.block, cfg.scheme
    chunks = Chunks(ctx, cfg.heldout, "signround")
    held, train = chunks.held, chunks.train  # among every rank's chunks
    local, owner = chunks.local, chunks.owner
    dist, bs = ctx.dist, ctx.batch_size
    args32 = ctx.args_as(torch.float32)
    teacher = teacher_outputs(ctx, args32)
    targets: dict[int, Tensor] = {}
    if cfg.target == "compressed":
        with torch.no_grad():
            for c in range(ctx.n_chunks):
                targets[c] = ctx.run(teacher, c, ctx.inputs(c, torch.float32), args32).cpu()
    del teacher
    linears = {n: m for n, m in block_linears(block).items() if step.selects(ctx.prefix + n)}
    for p in block.parameters():
        p.requires_grad_(False)
    grids = {n: LearnedGrid(m.weight.data, scheme, keep_mask(m), cfg.min_range,
                            cfg.learn_range, cfg.clip_search).to(ctx.device)
             for n, m in linears.items()}
    if cfg.init == "gptq":
        _gptq_start(ctx, linears, grids, chunks.mine(train), cfg, args32)
    params = [p for g in grids.values() for p in g.params()]
    first = {n: g.offsets() for n, g in grids.items()}
    cuda = ctx.device.type == "cuda" and torch.cuda.is_bf16_supported()

    def output(c: int, sel: Tensor | None) -> Tensor:
        """The block's output on chunk ``c``, at the flat token positions ``sel`` (None:
        every position, [n, T, d])."""
        x = ctx.inputs(c, torch.float32)
        sel = None if sel is None else sel.to(ctx.device)
        scope = contextlib.nullcontext() if sel is None else _on_tokens(parts, sel)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cuda), scope:
            return _rows(ctx.run(block, c, x, args32), sel)

    def loss_of(c: int, sel: Tensor | None = None) -> Tensor:
        target = targets[c] if targets else ctx.teacher_cache.read_output(c)
        return relative_mse(output(c, sel), _rows(target, sel).to(ctx.device, torch.float32))

    def heldout_loss() -> float:
        with torch.no_grad():
            return chunks.heldout_mean(lambda c: loss_of(c).item())

    steps, lr = cfg.steps, cfg.step_lr
    history: list[dict[str, float]] = []
    gen = torch.Generator().manual_seed(cfg.seed + ctx.index)
    n_rows = ctx.batch_size * ctx.seqlen
    n_sample = max(1, round(cfg.token_fraction * n_rows))
    parts = _tokenwise_parts(ctx) if n_sample < n_rows else []

    def sample() -> Tensor | None:
        return torch.randperm(n_rows, generator=gen)[:n_sample].sort().values if parts else None

    with _on_grids(linears, grids):
        start = heldout_loss()
        best = Best(params, start)
        history.append({"step": 0, "heldout": start})
        no_sample = None if parts or n_sample == n_rows else "the block has no token-wise part"
        if parts and train:  # the sampled outputs must be the full block's at those tokens
            sel = sample()
            if local(train[0]) is not None:
                no_sample = _sampling_refused(output, local(train[0]), sel)
            if dist is not None:
                no_sample = dist.broadcast_json(no_sample, owner(train[0]))
            if no_sample:
                log.warning("%ssignround: every token per step (%s)", ctx.prefix, no_sample)
                parts = []
        for i in range(1, steps + 1 if train else 1):
            # every rank draws the same chunk and tokens; the rank holding the chunk computes
            # the step, the others take its signs
            g = train[int(torch.randint(0, len(train), (1,), generator=gen))]
            sel, src, signs, loss = sample(), owner(g), None, None
            if (c := local(g)) is not None:
                loss = loss_of(c, sel)
                for p in params:
                    p.grad = None
                loss.backward()
                signs = torch._foreach_sign([p.grad for p in params])
            _sign_step(params, signs, src, dist, lr * (1 - (i - 1) / steps))  # decay to 0
            for grid in grids.values():
                grid.clamp_()
            if i % cfg.eval_every == 0 or i == steps:
                h = heldout_loss()
                value = chunks.share_value(loss.item() if loss is not None else None, src)
                history.append({"step": i, "loss": value, "heldout": h})
                best.offer(h, i)
        best.restore()
        if dist is not None:  # the ranks took the same steps; rank 0's state, to be sure
            for grid in grids.values():
                _share_grid(dist, grid, 0)
    moved = sum(int((g.offsets() != first.pop(n)).sum()) for n, g in grids.items())
    for n, m in linears.items():
        W, state = grids[n].final()
        m.weight.data = W.to(m.weight.dtype)
        m.llmc_quant = state
        state.codes(m.weight.data, ctx.prefix + n)  # refuses a weight off its grid
    score, best_step = best.score, best.step
    log.info("%ssignround: held-out loss %.5f -> %.5f (step %d of %d), %.1f s", ctx.prefix,
             start, score, best_step, steps, time.perf_counter() - t0)
    del grids, params, best
    ctx.forward(ctx.forward_copy(), store=True)
    n_weights = sum(m.weight.numel() for m in linears.values())
    return {"init": cfg.init, "target": cfg.target, "iters": steps, "lr": lr,
            "tokens": n_sample / n_rows if parts else 1.0,
            **({"tokens_refused": no_sample} if no_sample else {}),
            "heldout_start": start, "heldout_best": score, "best_step": best_step,
            "moved": moved / max(n_weights, 1), "history": history,
            "train_windows": len(train) * bs,
            "heldout_windows": ctx.total_windows - held[0] * bs,
            "linears": len(linears), "seconds": time.perf_counter() - t0}


class SignRound(BlockTransform):
    """The ``signround`` recipe step: a block transform that ends with the targeted Linears
    quantized (see the module)."""

    kind = TRANSFORM
    needs_calibration = True
    stores_outputs = True
    needs_teacher = True
    distributed = True  # the ranks split the forwards; each step is its chunk's rank's

    def __init__(self, config: SignRoundConfig) -> None:
        self.config = config

    def check_model(self, config: Any, adapter: Any) -> None:
        return None

    def transform(self, ctx: BlockContext, step: Any) -> dict[str, Any]:
        return signround_block(ctx, step, self.config)


METHODS.register("signround", SignRoundConfig, SignRound,
                 "learned rounding (SignRound, AutoRound's method): per-weight rounding offsets "
                 "and per-group ranges by signed gradient descent on each block's output error",
                 role="quantizer")
