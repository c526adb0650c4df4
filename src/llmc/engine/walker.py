"""The walk: compress a model one decoder block at a time on cached calibration inputs.

1. Capture: run the calibration windows through the embeddings with every block replaced by a
   recorder, keeping block 0's inputs (the activation cache) and each block's other arguments.
2. Per block: the block comes onto the compute device (float32 masters); hooks on the targeted
   Linears feed each method's statistics (one object per group of Linears that read the same
   input); the methods compress; the block's outputs on the compressed weights become the next
   block's inputs; the block goes to the checkpoint writer (when streaming) and leaves the
   device.

True-sequential methods (GPTQ by default) compress q/k/v, then o, then gate/up, then down,
each from inputs that already went through the compressed earlier Linears. In ``lockstep``
mode the walk gets that in ONE forward pass per block: each chunk of calibration windows runs
as a greenlet (a paused call stack); at the first Linear of a group, each chunk adds its inputs
to the group's statistics and pauses; once all chunks are in, the group is compressed and the
chunks go on, now through the compressed weights. Every paused chunk keeps its intermediates
alive meanwhile; ``replay`` mode instead runs one pass per group, each chunk stopping at that
group's input, then one output pass: more compute, one chunk's intermediates at a time, the same
tensors. Methods that want statistics of the uncompressed block get a statistics pass, then an
output pass.

Block transforms (AWQ, block-wise distillation) run before the Linear steps that follow them in
the recipe: they get a :class:`~llmc.interfaces.BlockContext`, run their own passes and rewrite
the block's float32 weights.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmc.core import act as act_quant
from llmc.core.stats import AbsMaxStats
from llmc.core.tree import cast_floats
from llmc.engine.blocks import move_block
from llmc.engine.cache import ActivationCache
from llmc.engine.capture import capture
from llmc.engine.config import WalkerConfig
from llmc.engine.distributed import Distributed, pack_result, unpack_result
from llmc.engine.lockstep import Lockstep, Reached
from llmc.engine.memory import peak_rss_bytes, release_memory, rss_bytes
from llmc.interfaces import LINEAR, TRANSFORM, BlockArgs, BlockContext, CodesCompressor, Planner
from llmc.models import kvcache
from llmc.models.adapters import Adapter, block_linears
from llmc.models.moe import expert_lists

log = logging.getLogger(__name__)

LOCKSTEP_MODES = ("lockstep", "replay")
ACT_RANGE = "act_range"  # the statistics kind of static activation scales


class _ActRange:
    """Makes the :class:`~llmc.core.stats.AbsMaxStats` of a group whose inputs get a static
    scale."""

    new_stats = AbsMaxStats


@dataclass
class LayerRecord:
    name: str
    step: int
    method: str
    shape: tuple[int, int]
    error: float | None
    seconds: float
    sparsity: float | None = None  # fraction of the weight a pruning step's mask zeroes


@dataclass
class WalkReport:
    layers: list[LayerRecord] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    transforms: list[dict[str, Any]] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)
    experts: list[dict[str, Any]] = field(default_factory=list)  # MoE: tokens per expert
    capture_seconds: float = 0.0
    engine: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineOptions:
    """Where the walk runs: the compute ``device``; the activation cache in ``cache`` (``ram``
    or ``disk``, files in ``offload_dir``); true-sequential groups in ``lockstep`` or
    ``replay`` mode; ``exact_stats``: statistics summed in float64, so that the same windows
    split over any number of processes give the same checkpoint."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache: str = "ram"
    offload_dir: Any = None
    lockstep: str = "lockstep"
    exact_stats: bool = False

    def __post_init__(self) -> None:
        if self.lockstep not in LOCKSTEP_MODES:
            raise ValueError(f"lockstep: {self.lockstep!r} is not one of {LOCKSTEP_MODES}")


def calibrating(steps: list[tuple[int, Any, Any]], kv_cache: Any = None) -> bool:
    """Whether a walk of ``steps`` runs the calibration windows (a step needs them, or static
    activation or KV-cache scales are calibrated on them)."""
    return kv_cache is not None or any(
        c.needs_calibration or act_quant.calibrated(s.config) for _, s, c in steps)


def reads_as_stored(steps: list[tuple[int, Any, Any]], kv_cache: Any = None) -> bool:
    """Whether a streamed walk of ``steps`` can read its blocks in the checkpoint's dtype
    rather than float32: one step, data-free, that gives its codes alone (RTN); see
    :class:`~llmc.interfaces.CodesCompressor`."""
    return len(steps) == 1 and isinstance(steps[0][2], CodesCompressor) \
        and not calibrating(steps, kv_cache)


def check_distributed(steps: list[tuple[int, Any, Any]]) -> None:
    """Refuse, before anything loads, what the distributed walk does not share yet: block
    transforms that do not reduce their statistics and losses across ranks (AWQ and
    SmoothQuant do; SignRound and block-wise distillation do not)."""
    for _, step, comp in steps:
        if comp.kind == TRANSFORM and not getattr(comp, "distributed", False):
            raise ValueError(f"{step.method}: this step does not run over several processes "
                             "yet (its losses and statistics are not reduced across ranks); "
                             "run it in one process (without torchrun)")


def _masters(blocks: Any) -> str:
    """What the walk compresses: the resident model's weights, or each streamed block read in
    float32 or as stored."""
    if not getattr(blocks, "lazy", False):
        return "resident"
    return "as stored" if blocks.dtype is None else str(blocks.dtype).removeprefix("torch.")


def _drop_masks(block: nn.Module) -> None:
    """Pruning masks live for one block's steps (a bool per weight would otherwise stay for
    the whole model); the zeros themselves stay in the weights."""
    for m in block.modules():
        if hasattr(m, "llmc_mask"):
            del m.llmc_mask


def _drop_codes(block: nn.Module) -> None:
    for m in block.modules():
        if hasattr(m, "llmc_codes"):
            del m.llmc_codes


class Engine:
    """Walks the blocks of ``blocks`` (a block store), compressing the Linears each step
    selects. ``steps`` are ``(index, Step, compressor)`` in recipe order. ``checkpoint``, when
    given, takes each finished block (:meth:`block_done`) and the state at every block
    boundary (:meth:`boundary`), and says where a resumed run starts (``resume_point``)."""

    def __init__(self, blocks: Any, adapter: Adapter, steps: list[tuple[int, Any, Any]],
                 config: WalkerConfig, options: EngineOptions | None = None,
                 checkpoint: Any = None, progress: bool = True, kv_cache: Any = None,
                 dist: Distributed | None = None) -> None:
        self.blocks = blocks
        self.adapter = adapter
        self.steps = steps
        self.config = config
        self.options = options or EngineOptions()
        self.device = torch.device(self.options.device)
        self.checkpoint = checkpoint
        self.progress = progress
        self.kv_cache = kv_cache  # a KVCacheScheme: each block's k/v scales from its outputs pass
        self.dist = dist  # this rank of a process group (None: one process)
        self._kv_ranges = kvcache.KVRanges()
        self.report = WalkReport()
        self._load_seconds = 0.0
        self._fwd: nn.Module | None = None  # the block copy the current Linear phase runs
        # MoE: (experts path, expert) -> tokens routed, statistics rows, fallbacks, this block
        self._experts: dict[tuple[str, int], dict[str, Any]] = {}
        # over several processes: this rank's first window among all ranks', their number,
        # and where every rank writes its share of the resume state (rank 0's output)
        self._first_window, self._all_windows = 0, None
        self._snapshots: Path | None = None
        self.report.engine = {"device": str(self.device), "cache": self.options.cache,
                              "lockstep": self.options.lockstep,
                              "streaming": bool(getattr(blocks, "lazy", False)),
                              "masters": _masters(blocks),
                              "exact_stats": self.options.exact_stats}
        if dist is not None:
            check_distributed(steps)

    # -- helpers -----------------------------------------------------------------------------
    def prefix(self, b: int) -> str:
        return f"{self.adapter.blocks}.{b}."

    def _bar(self, items, desc: str = "Compressing blocks", initial: int = 0,
             unit: str = "block"):
        if not self.progress:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit=unit, initial=initial, total=initial + len(items))

    def _cache(self, S: int, T: int, name: str) -> ActivationCache:
        hidden = self.blocks.model.config.get_text_config().hidden_size
        return ActivationCache(S, T, hidden, self.config.torch_dtype, self.config.batch_size,
                               self.options.cache, self.options.offload_dir, name,
                               pin=self.device.type == "cuda" and self.options.cache == "ram")

    def _context(self, b: int, block: nn.Module, cache: ActivationCache,
                 args: BlockArgs) -> BlockContext:
        dtype = self.config.torch_dtype
        return BlockContext(
            b, block, self.prefix(b), self.adapter, cache,
            {n: cast_floats(a, dtype, self.device) for n, a in args.items()},
            self.config.batch_size, dtype, self.device, raw_args=args,
            min_tokens=self.config.min_expert_tokens,
            store_scope=(None if self.kv_cache is None
                         else lambda: kvcache.observing(self._kv_ranges)),
            dist=self.dist, first_chunk=self._first_window // self.config.batch_size,
            all_windows=self._all_windows, exact_stats=self.options.exact_stats,
        )

    @property
    def calibrating(self) -> bool:
        """Whether the walk runs the calibration windows (a step needs them, or the KV cache's
        scales are calibrated on them)."""
        return calibrating(self.steps, self.kv_cache)

    def _kv_scales(self, ctx: BlockContext) -> None:
        """The block's attention modules get the static k/v scales of what their keys and
        values were in the block's outputs pass (the final weights)."""
        for name, m in kvcache.attention_modules(ctx.block).items():
            if self.dist is not None and ctx.prefix + name in self._kv_ranges.amax:
                # the largest |k| and |v| over every rank's windows (exact in any order)
                self._kv_ranges.amax[ctx.prefix + name] = tuple(
                    self.dist.all_reduce(t.clone(), "max")
                    for t in self._kv_ranges.amax[ctx.prefix + name])
            k, v = self._kv_ranges.pop_scales(ctx.prefix + name, self.kv_cache)
            kvcache.set_scales(m, self.kv_cache, k, v)

    # -- groups and compression ------------------------------------------------------------
    def _groups(self, block_index: int, linears: dict[str, nn.Linear],
                steps: list) -> list[list[str]]:
        """Targeted Linears (relative names) grouped by shared input, in execution order."""
        prefix = self.prefix(block_index)
        routers = set(self.adapter.routers)
        targeted = {n for n in linears if any(
            s.selects(prefix + n) and (n not in routers or s.names(prefix + n))
            for _, s, _ in steps)}
        groups = [[n for n in g if n in targeted] for g in self.adapter.groups]
        covered = {n for g in groups for n in g}
        groups += [[n] for n in linears if n in targeted and n not in covered]
        return [g for g in groups if g]

    def _compress_group(self, block_index: int, group: list[str], masters: dict[str, nn.Linear],
                        copies: dict[str, nn.Linear], stats: dict[tuple[int, str], Any],
                        steps: list, codes_only: bool = False) -> None:
        """Every step of ``steps`` on the Linears of ``group``. ``codes_only`` (a streamed walk
        with no forwards): a :class:`CodesCompressor` that is the last step to touch a Linear
        gives the codes alone, and the weight keeps its loaded value (the writer replaces it).

        Over several processes the group's statistics are summed first, each Linear is solved
        by its owner rank, and the owners broadcast what they solved (see
        :mod:`llmc.engine.distributed`); the report lists the Linears in the same order as one
        process does."""
        prefix = self.prefix(block_index)
        dist = self.dist
        if dist is not None:
            self._reduce_stats(group, stats)
        for (gid, kind), st in stats.items():  # how many Linears each statistics object serves
            if gid == id(group) and hasattr(st, "readers"):
                st.readers = sum(1 for _, step, comp in steps if comp.stats_kind == kind
                                 for n in group if step.selects(prefix + n))
        todo = [(idx, step, comp, n) for idx, step, comp in steps for n in group
                if step.selects(prefix + n)]
        owner = None
        if dist is not None:
            owner = dist.owners({n: float(masters[n].in_features) ** 2 * masters[n].out_features
                                 for n in dict.fromkeys(n for *_, n in todo)})
        solved: dict[tuple[int, str], Any] = {}
        sparsity: dict[tuple[int, str], float | None] = {}
        for idx, step, comp, n in todo:  # this rank's Linears (every one in one process)
            if owner is None or owner[n] == dist.rank:
                res = self._solve(idx, step, comp, prefix, n, group, masters, stats, steps,
                                  codes_only)
                sparsity[(idx, n)] = self._apply(idx, step, n, group, masters, copies, stats, res)
                solved[(idx, n)] = res
        if owner is not None:  # the owners' results to every rank, in the walk's order
            for idx, step, _, n in todo:
                if owner[n] == dist.rank:
                    dist.broadcast_tensors(*pack_result(solved[(idx, n)]), src=owner[n])
                else:
                    res = unpack_result(*dist.broadcast_tensors(None, None, src=owner[n]),
                                        device=masters[n].weight.device)
                    if res.info.get("fallback"):
                        self._note_fallback(group, step, res)
                    sparsity[(idx, n)] = self._apply(idx, step, n, group, masters, copies,
                                                     stats, res)
                    solved[(idx, n)] = res
        for idx, step, _, n in todo:
            res = solved[(idx, n)]
            self.report.layers.append(LayerRecord(
                prefix + n, idx, step.method, tuple(masters[n].weight.shape), res.error,
                res.seconds, sparsity[(idx, n)],
            ))
        expert = self._expert_of(group[0])
        if expert is not None and expert[2] == 0:  # the expert's first group: its input rows
            self._seen_expert(expert)["rows"] = max(
                (st.nsamples for (gid, _), st in stats.items() if gid == id(group)), default=0)
        for key in [k for k in stats if k[0] == id(group)]:
            del stats[key]

    def _reduce_stats(self, group: list[str], stats: dict[tuple[int, str], Any]) -> None:
        """The group's statistics summed over the ranks (a rank that saw none of its inputs
        takes part with empty ones)."""
        kinds = sorted({k for gid, k in stats if gid == id(group)})
        kinds = self.dist.broadcast_json(kinds, src=0)  # the same kinds on every rank
        for kind in kinds:
            st = stats.get((id(group), kind))
            if st is None or not hasattr(st, "reduce"):
                raise ValueError(f"statistics of kind {kind!r} cannot be reduced over "
                                 "processes; run this recipe in one process")
            st.reduce(self.dist)

    def _note_fallback(self, group: list[str], step: Any, res: Any) -> None:
        expert = self._expert_of(group[0])
        if expert is not None:
            self._seen_expert(expert)["fallback"].add(f"{step.method}->{res.info['fallback']}")

    def _solve(self, idx: int, step: Any, comp: Any, prefix: str, n: str, group: list[str],
               masters: dict[str, nn.Linear], stats: dict[tuple[int, str], Any], steps: list,
               codes_only: bool) -> Any:
        """Step ``idx`` on Linear ``n``: its :class:`~llmc.interfaces.CompressResult`."""
        full = prefix + n
        master = masters[n]
        st = stats.get((id(group), comp.stats_kind)) if comp.stats_kind else None
        mask = getattr(master, "llmc_mask", None)
        last = codes_only and st is None and mask is None \
            and isinstance(comp, CodesCompressor) \
            and all(not later.selects(full) for i, later, _ in steps if i > idx)
        if last:
            return comp.compress_codes(full, master.weight.data, mask=mask)
        if self._expert_of(group[0]) is not None and comp.needs_calibration \
                and st is not None and st.nsamples < self.config.min_expert_tokens:
            # an expert the router starved: its statistics cannot be trusted
            res = comp.compress_without_data(full, master.weight.data, mask=mask)
            self._note_fallback(group, step, res)
            return res
        return comp.compress(full, master.weight.data, st, mask=mask)

    def _apply(self, idx: int, step: Any, n: str, group: list[str],
               masters: dict[str, nn.Linear], copies: dict[str, nn.Linear],
               stats: dict[tuple[int, str], Any], res: Any) -> float | None:
        """Step ``idx``'s result on Linear ``n`` into its master, its forward copy and what
        the writer and later steps read (codes, qparams, mask, activation scale); returns the
        fraction of the weight a mask zeroes (None: not pruned)."""
        master = masters[n]
        mask = getattr(master, "llmc_mask", None)
        w = master.weight.data
        if res.weight is None:
            pass  # codes only: the writer takes them, the block is dropped after
        elif res.weight.dtype == w.dtype and res.weight.shape == w.shape \
                and res.weight.device == w.device and res.weight.is_contiguous():
            master.weight.data = res.weight  # a new tensor: take it, no copy
        else:
            w.copy_(res.weight.to(w.dtype))
        if copies[n] is not master and res.weight is not None:
            copies[n].weight.data.copy_(res.weight.to(copies[n].weight.dtype))
        if res.quant is not None:
            master.llmc_quant = res.quant.state()  # qparams; writers recover the codes
        act = getattr(step.config, "act_scheme", None)
        if act is not None:  # its input quantized in the forward from now on
            scale = None
            if act.dynamic is not True:  # on the range its calibration inputs had
                scale = act_quant.static_scale(stats[(id(group), ACT_RANGE)].amax, act)
            act_quant.attach(master, act, scale)
            if copies[n] is not master:
                act_quant.attach(copies[n], act, scale)
        if self.checkpoint is not None:
            # Streaming: the block is packed right after its steps, so its codes are
            # kept until then rather than recovered from the weight again.
            if res.quant is not None:
                master.llmc_codes = res.quant.q
            elif hasattr(master, "llmc_codes"):
                del master.llmc_codes
        if res.mask is not None:
            # Later steps of this block keep these zeros; dropped after the block.
            master.llmc_mask = res.mask
            master.llmc_sparsity = {"structure": step.config.structure,
                                    "sparsity": 1.0 - float(res.mask.float().mean())}
            return master.llmc_sparsity["sparsity"]
        return master.llmc_sparsity["sparsity"] if mask is not None else None

    def _expert_of(self, name: str) -> tuple[str, int, int] | None:
        """``(experts path, expert index, group position in the expert)`` of a Linear in an
        MoE layer (relative name), None outside the experts."""
        for path in self.adapter.experts:
            if name.startswith(path + "."):
                e = int(name[len(path) + 1:].split(".", 1)[0])
                members = [g for g in self.adapter.groups
                           if g[0].startswith(f"{path}.{e}.")]
                pos = next(i for i, g in enumerate(members) if name in g)
                return path, e, pos
        return None

    def _seen_expert(self, expert: tuple[str, int, int]) -> dict[str, Any]:
        return self._experts.setdefault(expert[:2], {"tokens": None, "rows": 0,
                                                     "fallback": set()})

    def _report_experts(self, b: int) -> None:
        """Per expert of block ``b``: calibration tokens routed to it, rows its statistics saw,
        the data-free fallback it got (warned). Over several processes the tokens are summed
        over the ranks (the rows and fallbacks are already the reduced statistics')."""
        if self.dist is not None:
            self._reduce_expert_tokens()
        for (path, e), seen in sorted(self._experts.items()):
            record = {"block": b, "experts": path, "expert": e, "tokens": seen["tokens"],
                      "statistics_rows": seen["rows"],
                      "fallback": sorted(seen["fallback"]) or None}
            self.report.experts.append(record)
            if record["fallback"]:
                log.warning("block %d, %s.%d: %s routed calibration tokens (its statistics saw "
                            "%d rows, fewer than min_expert_tokens=%d): compressed without data "
                            "(%s)", b, path, e, record["tokens"], seen["rows"],
                            self.config.min_expert_tokens, ", ".join(record["fallback"]))
        self._experts = {}

    def _reduce_expert_tokens(self) -> None:
        """Every rank's count of the tokens routed to each expert, summed (rank 0's experts:
        every rank calls each expert on every chunk, so the lists agree)."""
        keys = self.dist.broadcast_json([list(k) for k in sorted(self._experts)], src=0)
        counts = torch.zeros(2, len(keys), dtype=torch.int64)  # tokens, ranks that counted
        for i, k in enumerate(keys):
            tokens = self._experts.get(tuple(k), {}).get("tokens")
            if tokens is not None:
                counts[0, i], counts[1, i] = tokens, 1
        self.dist.all_reduce(counts)
        for i, k in enumerate(keys):
            seen = self._seen_expert((*k, 0))
            seen["tokens"] = int(counts[0, i]) if counts[1, i] else None

    def _counter(self, fwd: nn.Module) -> Callable[[list[str]], None]:
        """``count(group)``: the rows the ExpertList calling an expert group routes to it, added
        to that expert's tokens (called from the group's first Linear's hook)."""
        lists = expert_lists(fwd)

        def count(group: list[str]) -> None:
            ex = self._expert_of(group[0])
            if ex is None or ex[2] != 0:
                return
            seen = self._seen_expert(ex)
            seen["tokens"] = (seen["tokens"] or 0) + lists[ex[0]].routed

        return count

    def _feeder(self, masters: dict[str, nn.Linear], steps: list,
                stats: dict[tuple[int, str], Any],
                prefix: str) -> Callable[[list[str], Tensor], None]:
        """``feed(group, x)``: x into every statistics object of the group's methods, made on
        the group's first input (so only the groups in flight hold statistics). A group whose
        inputs its step quantizes dynamically feeds its methods the quantized input, what its
        Linears compute on once compressed (GPTQ W8A8 on held-out windows: 29.389 against
        29.515 with the unquantized input, ``benchmarks/results/README.md``); a static scale's
        range is taken on the input itself."""
        kinds = []
        for _, _, comp in steps:
            if comp.needs_calibration and comp.stats_kind and comp.stats_kind not in (
                    k for k, _ in kinds):
                kinds.append((comp.stats_kind, comp))
        if any(act_quant.calibrated(s.config) for _, s, _ in steps):
            kinds.append((ACT_RANGE, _ActRange))

        count = self._counter(self._fwd) if self._fwd is not None else (lambda g: None)

        acts: dict[int, Any] = {}

        def feed(group: list[str], x: Tensor) -> None:
            if id(group) not in acts:
                acts[id(group)] = next(
                    (a for _, s, _ in steps if s.selects(prefix + group[0])
                     and (a := getattr(s.config, "act_scheme", None)) is not None
                     and a.dynamic is True), None)
            act = acts[id(group)]
            xq = x if act is None else act_quant.fake_quantize_act(x, act)
            for kind, comp in kinds:
                key = (id(group), kind)
                if key not in stats:
                    stats[key] = self.prepare(comp.new_stats(masters[group[0]].in_features))
                stats[key].add_batch(x if kind == ACT_RANGE else xq)
            count(group)

        return feed

    def _phases(self) -> list[tuple[str, list]]:
        """Consecutive recipe steps of one kind: block transforms (rewrite the whole block from
        its cached inputs) and Linear compressors (one walk through the block)."""
        phases: list[tuple[str, list]] = []
        for item in self.steps:
            kind = item[2].kind  # LINEAR or TRANSFORM (whole-model steps run after the walk)
            if phases and phases[-1][0] == kind and kind == LINEAR:
                phases[-1][1].append(item)
            else:
                phases.append((kind, [item]))
        return phases

    def run_block(self, ctx: BlockContext) -> None:
        """Compress one block; its outputs on the compressed weights go to ``ctx.cache``."""
        if self.kv_cache is not None:
            kvcache.mark(ctx.block, self.kv_cache, ctx.prefix)
        stored = False
        for m in expert_lists(ctx.block).values():  # copies made for forwards inherit it
            m.route_all = self.config.all_experts
        for kind, steps in self._phases():
            if kind == TRANSFORM:
                _drop_codes(ctx.block)  # a transform may rewrite weights already quantized
                for idx, step, comp in steps:
                    record = comp.transform(ctx, step)
                    self.report.transforms.append(
                        {"block": ctx.index, "step": idx, "method": step.method, **record}
                    )
                    # A step that wrote the block's outputs says so.
                    stored = comp.stores_outputs
            else:
                self._linear_phase(ctx, steps)
                stored = True
        if not stored:  # a transform came last: the next block needs this one's outputs
            ctx.forward(ctx.forward_copy(), store=True)
        for m in expert_lists(ctx.block).values():
            m.route_all = False
        self._report_experts(ctx.index)
        _drop_masks(ctx.block)
        if self.kv_cache is not None:
            self._kv_scales(ctx)

    def _linear_phase(self, ctx: BlockContext, steps: list) -> None:
        """Compress the Linears that ``steps`` target; the block's outputs on the compressed
        weights go to the cache."""
        block_index, block, dtype = ctx.index, ctx.block, ctx.dtype
        masters = block_linears(block)
        groups = self._groups(block_index, masters, steps)
        fwd = block if dtype == torch.float32 else copy.deepcopy(block).to(dtype)
        copies = block_linears(fwd)
        stats: dict[tuple[int, str], Any] = {}
        self._fwd = fwd
        for seen in self._experts.values():  # an earlier phase's count is not this one's
            seen["tokens"] = None
        feed = self._feeder(masters, steps, stats, self.prefix(block_index))
        calibrating = any(c.needs_calibration or act_quant.calibrated(s.config)
                          for _, s, c in steps)
        sequential = calibrating and all(
            c.sequential for _, _, c in steps if c.needs_calibration
        )
        done: set[int] = set()

        def compress(group: list[str]) -> None:
            self._compress_group(block_index, group, masters, copies, stats, steps)
            done.add(id(group))

        if sequential and self.options.lockstep == "replay":
            self._replay(ctx, fwd, groups, copies, feed, compress)
        elif sequential:
            self._lockstep(ctx, fwd, groups, copies, feed, compress, done)
        else:
            handles = []
            if calibrating:
                for g in groups:
                    handles.append(copies[g[0]].register_forward_pre_hook(
                        lambda _m, inp, g=g: feed(g, inp[0])))
            try:
                if calibrating:
                    ctx.forward(fwd)
            finally:
                for h in handles:
                    h.remove()
            for g in groups:
                compress(g)
            count = self._counter(fwd)
            handles = [] if calibrating else [  # tokens per expert from the output pass
                copies[g[0]].register_forward_pre_hook(lambda *_, g=g: count(g)) for g in groups]
            try:
                ctx.forward(fwd, store=True)
            finally:
                for h in handles:
                    h.remove()
        self._fwd = None
        missing = [g for g in groups if id(g) not in done]
        if missing:
            raise ValueError(
                f"block {block_index}: the Linears {missing} were never called during the forward "
                "pass; exclude them with the step's `ignore`"
            )

    def _lockstep(self, ctx: BlockContext, fwd: nn.Module, groups: list[list[str]],
                  copies: dict[str, nn.Linear], feed: Callable, compress: Callable,
                  done: set[int]) -> None:
        """One pass, every chunk pausing at each group's input until all chunks are in.

        The tail (down_proj in llama-like blocks) is the last group and lands straight on the
        residual: during the pass it adds its inputs to the statistics, keeps them and returns
        zeros, so each chunk's forward finishes (freeing its call stack) with the residual as
        output; once compressed, the tail's outputs are added to the stored residuals."""
        lockstep = Lockstep(ctx.n_chunks)
        tail = self.adapter.tail if groups and groups[-1] == [self.adapter.tail] else None
        tail_inputs: dict[int, Tensor] = {}
        chunk_of: dict[Any, int] = {}

        def forward_chunk(c: int) -> None:
            chunk_of[lockstep.current()] = c
            ctx.forward_chunk(fwd, c, store=True)

        def hook_for(group: list[str]):
            def pre_hook(module: nn.Module, inputs: tuple) -> tuple | None:
                if id(group) not in done:
                    hooked = getattr(module, "_llmc_act_hooked", False)
                    feed(group, inputs[0])
                    lockstep.barrier(lambda: compress(group))
                    if not hooked:  # an activation hook attached just now runs from the
                        return act_quant.quantize_inputs(module, inputs)  # next call on
                return None
            return pre_hook

        def tail_forward(x: Tensor) -> Tensor:
            feed(groups[-1], x)
            tail_inputs[chunk_of[lockstep.current()]] = x
            return x.new_zeros(*x.shape[:-1], copies[tail].out_features)

        # Members of a group read the same input: the first member's hook speaks for all.
        handles = [copies[g[0]].register_forward_pre_hook(hook_for(g)) for g in groups
                   if g[0] != tail]
        try:
            with ctx.replaced_forward(copies.get(tail), tail_forward), torch.no_grad():
                lockstep.run(forward_chunk)
        finally:
            for h in handles:
                h.remove()
        if tail is not None:
            compress(groups[-1])
            with torch.no_grad():
                for c in sorted(tail_inputs):
                    y = copies[tail](tail_inputs.pop(c))
                    ctx.store(c, ctx.outputs(c).to(y.dtype) + y)

    def _replay(self, ctx: BlockContext, fwd: nn.Module, groups: list[list[str]],
                copies: dict[str, nn.Linear], feed: Callable, compress: Callable) -> None:
        """One pass per group, each chunk stopping at the group's input, then the output pass:
        one chunk's intermediates alive at a time."""
        for g in groups:
            def stop(_m: nn.Module, inputs: tuple, g: list[str] = g) -> None:
                feed(g, inputs[0])
                raise Reached

            handle = copies[g[0]].register_forward_pre_hook(stop)
            try:
                with torch.no_grad():
                    for c in range(ctx.n_chunks):
                        try:
                            ctx.run(fwd, c)
                        except Reached:
                            pass
            finally:
                handle.remove()
            compress(g)
        ctx.forward(fwd, store=True)

    # -- whole walks --------------------------------------------------------------------------
    def _finish_block(self, b: int, block: nn.Module, t0: float) -> None:
        """The block off the device, to the checkpoint writer, out of memory."""
        t1 = time.perf_counter()
        if self.device.type != "cpu":
            move_block(block, torch.device("cpu"))
        if self.checkpoint is not None:
            self.checkpoint.block_done(b, block, self.report)
        self.blocks.unload(b)
        release_memory()
        memory = {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
        if self.device.type == "cuda":
            memory["peak_device_bytes"] = torch.cuda.max_memory_allocated(self.device)
        self.report.blocks.append({"block": b, "seconds": time.perf_counter() - t0,
                                   "load_seconds": self._load_seconds,
                                   "pack_seconds": time.perf_counter() - t1, **memory})

    def compress_without_data(self) -> None:
        """Every step needs no data (e.g. RTN): compress each targeted Linear directly (over
        several processes, rank 0 alone: there is nothing to share)."""
        if self.dist is not None and self.dist.rank != 0:
            self.blocks.close()
            return
        dist, self.dist = self.dist, None  # rank 0 works as one process: no collectives
        try:
            self._compress_all_without_data()
        finally:
            self.dist = dist

    def _compress_all_without_data(self) -> None:
        start = self.checkpoint.resume_point() if self.checkpoint is not None else None
        if start is not None:
            self.checkpoint.restore_report(self.report)
        start = start or 0
        try:
            for b in self._bar(range(start, len(self.blocks)), initial=start):
                t = time.perf_counter()
                block = self.blocks.load(b)
                self._load_seconds = time.perf_counter() - t
                masters = block_linears(block)
                for g in self._groups(b, masters, self.steps):
                    self._compress_group(b, g, masters, masters, {}, self.steps,
                                         codes_only=self.checkpoint is not None)
                self._report_experts(b)
                _drop_masks(block)
                self._finish_block(b, block, t)
                if self.checkpoint is not None:
                    self.checkpoint.boundary(b + 1, self.report)
        finally:
            self.blocks.close()

    def prepare(self, stats: Any) -> Any:
        """New statistics of a planning pass, summed in float64 with ``exact_stats``."""
        if self.options.exact_stats and hasattr(stats, "make_exact"):
            stats.make_exact()
        return stats

    def reduce(self, stats: Any) -> None:
        """A planning pass's statistics summed over the ranks (nothing in one process)."""
        if self.dist is not None:
            stats.reduce(self.dist)

    def dense_pass(self, visit: Callable[[BlockContext, nn.Module], Callable[[], Any]],
                   desc: str = "Planning") -> list[Any]:
        """The calibration windows through the uncompressed blocks in order, on a copy of the
        cached inputs (a planning pass: OWL's outlier ratios); see
        :class:`~llmc.interfaces.ModelPass`."""
        main = self._active_cache
        cache = self._cache(main.n_windows, main.seqlen, "planning")
        cache.copy_inputs_from(main)
        results = []
        try:
            for b in self._bar(range(len(self.blocks)), desc):
                block = self.blocks.load(b)
                ctx = self._context(b, block, cache, self._args[b])
                module = ctx.forward_copy()
                done = visit(ctx, module)
                ctx.forward(module, store=True)
                results.append(done())
                del module, ctx
                self.blocks.unload(b)
                cache.finish_block()
        finally:
            cache.close()
        return results

    def run(self, windows: Tensor | None) -> WalkReport:
        """Compress every block; ``windows`` ([S, T] token ids) may be None when no step needs
        calibration data."""
        if not self.calibrating:
            self.compress_without_data()
            return self.report
        if windows is None:
            raise ValueError("this recipe needs calibration data")
        if self.kv_cache is not None:
            first = self.adapter.get_blocks(self.blocks.model)[0]
            if not kvcache.attention_modules(first):
                raise ValueError(f"kv_cache: no attention module (a module named *Attention* "
                                 f"with k_proj and v_proj) in {type(first).__name__}; this "
                                 "architecture's KV cache cannot be quantized")
            kvcache.enable(self.blocks.model)
        ck = self.checkpoint
        S, T = windows.shape
        if self.dist is not None:
            start, saved = self._share_start(S)
        else:
            start, saved = (ck.resume_point() if ck is not None else None), None
        # (start None: a fresh run)
        cache = self._cache(S, T, "hidden")
        needs_teacher = any(c.kind == TRANSFORM and c.needs_teacher for _, _, c in self.steps)
        teacher = self._cache(S, T, "teacher") if needs_teacher else None
        self._active_cache = cache
        try:
            t = time.perf_counter()
            with self.blocks.embeddings() as model:
                self._args = capture(model, self.blocks.blocks, windows, self.config.batch_size,
                                     self.device, cache if start is None else None,
                                     bar=lambda s: self._bar(s, "Capturing block 0's inputs",
                                                             unit="chunk"))
            if start is None:  # a fresh run: block 0's inputs were just captured
                cache.finish_block()
                if teacher is not None:
                    teacher.copy_inputs_from(cache)
                self.report.capture_seconds = time.perf_counter() - t
                self._plan()
                start = 0
                self._boundary(0, cache, teacher)
            elif saved is not None:  # over several processes: each rank its own windows
                if ck is not None:
                    ck.restore_report(self.report)
                self.report.plans = saved["plans"]
                cache.restore(Path(saved["hidden"]), self._first_window, self._all_windows)
                if teacher is not None:
                    teacher.restore(Path(saved["teacher"]), self._first_window,
                                    self._all_windows)
                self._restore_plans()
            else:
                ck.restore_report(self.report)
                ck.restore_caches(cache, teacher)
                self._restore_plans()
            for b in self._bar(range(start, len(self.blocks)), initial=start):
                t = time.perf_counter()
                block = self.blocks.load(b)
                self._load_seconds = time.perf_counter() - t
                ctx = self._context(b, block, cache, self._args[b])
                if teacher is not None:
                    ctx.teacher = copy.deepcopy(block)
                    ctx.teacher_cache = teacher
                self.run_block(ctx)
                del ctx
                self._finish_block(b, block, t)
                cache.finish_block()
                if teacher is not None:
                    teacher.finish_block()
                self._boundary(b + 1, cache, teacher)
        finally:
            try:
                if ck is not None:
                    ck.wait()  # its writer may still be saving the cache's last snapshot
            finally:
                cache.close()
                if teacher is not None:
                    teacher.close()
                self.blocks.close()
        if self.dist is not None:  # every rank's counters, on every rank
            self.report.engine["distributed"] = self.dist.gather_records()
        return self.report

    def _share_start(self, n_windows: int) -> tuple[int | None, dict[str, Any] | None]:
        """Over several processes: where this rank's windows sit among all ranks' windows,
        and from rank 0 (the only one with the output's checkpoint) where the output's
        partial directory is and, for a resumed run, the block it starts at, its saved
        snapshot of the activations and the planning steps' choices."""
        d = self.dist
        counts = d.all_gather_int(n_windows)
        self._first_window, self._all_windows = sum(counts[: d.rank]), sum(counts)
        info = None
        if d.rank == 0:
            ck = self.checkpoint
            info = {"partial": None, "start": None, "saved": None}
            if ck is not None:
                info["partial"] = str(ck.partial)
                info["start"] = ck.resume_point()
                if info["start"] is not None:
                    files = ck.state["caches"]
                    info["saved"] = {**files, "plans": ck.state["report"]["plans"]}
        info = d.broadcast_json(info, 0)
        self._snapshots = Path(info["partial"]) if info["partial"] else None
        return info["start"], info["saved"]

    def _boundary(self, blocks_done: int, cache: ActivationCache,
                  teacher: ActivationCache | None) -> None:
        """The resume state at a block boundary. Over several processes every rank writes its
        own windows into the one snapshot file, then rank 0 writes the state that names it
        (so a run of any number of ranks can resume it); the second barrier keeps every rank
        from overwriting a snapshot before the state on disk names the newer one."""
        if self.dist is None:
            if self.checkpoint is not None:
                self.checkpoint.boundary(blocks_done, self.report, cache, teacher)
            return
        if self._snapshots is None:  # an in-memory run: no output, no state
            return
        files = {}
        for kind, c in (("hidden", cache), ("teacher", teacher)):
            if c is not None:
                path = (self._snapshots / f"{c.name}-snapshot-{blocks_done % 2}.bin").resolve()
                c.persist_part(path, self._first_window, self._all_windows)
                files[kind] = str(path)
        self.dist.barrier()
        if self.checkpoint is not None:
            self.checkpoint.boundary(blocks_done, self.report, files=files,
                                     world=self.dist.world)
        self.dist.barrier()

    def _plan(self) -> None:
        for idx, step, comp in self.steps:
            if isinstance(comp, Planner):
                record = comp.plan(self, step)
                if record:
                    self.report.plans.append({"step": idx, "method": step.method, **record})

    def _restore_plans(self) -> None:
        """A resumed run takes the planning steps' choices from the report it saved."""
        for idx, _, comp in self.steps:
            if isinstance(comp, Planner):
                for record in self.report.plans:
                    if record["step"] == idx:
                        comp.restore_plan(self, record)
