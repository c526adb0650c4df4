"""LayerWalker: compress a model one decoder block at a time on cached calibration inputs.

1. Capture: run the calibration windows through the embeddings with every block replaced by a
   recorder, keeping block 0's input hidden states (CPU) and each block's keyword arguments.
2. Per block: hooks on the targeted Linears feed each method's statistics (one object per
   group of Linears that read the same input); the methods compress; the results are written
   back; the block's outputs on the compressed weights become the next block's inputs.

True-sequential methods (GPTQ by default) compress q/k/v, then o, then gate/up, then down,
each from inputs that already went through the compressed earlier Linears. The walker gets
that in ONE forward pass per block: each chunk of calibration windows runs as a greenlet (a
paused call stack), one at a time; at the first Linear of a group, each chunk adds its inputs
to the group's statistics and pauses; once all chunks are in, the group is compressed and the
chunks go on, now through the compressed weights. The pass's outputs are
the compressed block's outputs, so no second pass is needed. Methods that want statistics of
the uncompressed block get a statistics pass, then an output pass.

Block transforms (AWQ) run before the Linear steps that follow them in the recipe: they get a
:class:`BlockContext` (the block, its cached inputs and arguments), run their own passes and
rewrite the block's float32 weights; the Linear steps then walk the rewritten block.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import greenlet
import torch
from torch import Tensor, nn

from llmc.models import Adapter, block_linears

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WalkerConfig:
    """``batch_size`` calibration windows per forward chunk; ``dtype`` of the block forwards
    (the weights being compressed and the Hessian sums stay float32)."""

    batch_size: int = 8
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} must be at least 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``): between blocks the
    freed activations of the last one are scattered through the heap, and without this the RSS
    keeps them."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def replaced_forward(module: nn.Module | None, forward: Callable[..., Any]) -> Iterator[None]:
    """``module`` computes ``forward`` instead of its own inside the block (hooks still run);
    nothing happens for ``module=None``."""
    if module is None:
        yield
        return
    module.forward = forward  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        del module.forward


class _Stop(Exception):
    """Raised by the capture recorder to end a forward early."""


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
    capture_seconds: float = 0.0


@dataclass
class BlockContext:
    """One block as a block transform (AWQ) sees it: the float32 master ``block``, its cached
    inputs ``hidden`` [S, T, d] (forward dtype, CPU; written in place with outputs when
    ``store``), the block's arguments per chunk size, and the forward settings."""

    index: int
    block: nn.Module
    prefix: str
    adapter: Adapter
    hidden: Tensor
    args: dict[int, tuple[tuple, dict]]
    batch_size: int
    dtype: torch.dtype
    device: torch.device
    # For steps that learn from the uncompressed model (block-wise distillation): the block as
    # it was before this block's steps, its inputs then, and the teacher's own hidden states
    # (the uncompressed model's block inputs, updated in place to its outputs by the step).
    teacher: nn.Module | None = None
    inputs: Tensor | None = None
    teacher_hidden: Tensor | None = None

    @property
    def n_chunks(self) -> int:
        return -(-self.hidden.shape[0] // self.batch_size)

    def forward_copy(self) -> nn.Module:
        """A copy of the block in the forward dtype, free to modify."""
        return copy.deepcopy(self.block).to(self.dtype)

    def forward_chunk(self, module: nn.Module, c: int, store: bool = False) -> None:
        bs = self.batch_size
        x = self.hidden[c * bs : (c + 1) * bs]
        n = x.shape[0]
        args, kwargs = self.args[n]
        out = module(x.to(self.device), *args, **kwargs)
        if store:
            # Chunk c's inputs are dead once its forward returned: its outputs replace them.
            self.hidden[c * bs : c * bs + n] = first_tensor(out).to("cpu", self.hidden.dtype)

    def forward(
        self, module: nn.Module, store: bool = False,
        before: Callable[[int], None] | None = None,
    ) -> None:
        """Every chunk through ``module``; ``before(c)`` runs ahead of chunk c."""
        with torch.no_grad():
            for c in range(self.n_chunks):
                if before is not None:
                    before(c)
                self.forward_chunk(module, c, store)


def _drop_masks(block: nn.Module) -> None:
    """Pruning masks live for one block's steps (a bool per weight would otherwise stay for
    the whole model); the zeros themselves stay in the weights."""
    for m in block.modules():
        if hasattr(m, "llmc_mask"):
            del m.llmc_mask


def first_tensor(out: Any) -> Tensor:
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


def _cast(obj: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Floating tensors inside kwargs (position embeddings, float masks) to the forward dtype."""
    return map_tensors(
        obj, lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)
    )


class _Recorder(nn.Module):
    """Stands in for block ``index`` during capture: block 0's recorder writes the chunk's
    hidden states into the cache; every recorder keeps its block's arguments once per chunk
    size; the last one ends the forward before the final norm and the head."""

    def __init__(self, index: int, sink: dict) -> None:
        super().__init__()
        self.index = index
        self.sink = sink

    def forward(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        sink = self.sink
        n = hidden.shape[0]
        if self.index == 0:
            if sink["cache"] is None:
                sink["cache"] = torch.empty(sink["samples"], *hidden.shape[1:],
                                            dtype=sink["dtype"])
            sink["cache"][sink["start"] : sink["start"] + n] = hidden.detach().to("cpu")
        if n not in sink["kwargs"][self.index]:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
            sink["kwargs"][self.index][n] = (args, kwargs)
        elif self.index == 0:
            raise _Stop  # arguments of this chunk size are known: only block 0's input needed
        if self.index == sink["last"]:
            raise _Stop
        return hidden


class _Lockstep:
    """Runs ``work(i)`` for ``n`` chunks as greenlets in this thread, in lockstep: a chunk that
    reaches :meth:`barrier` pauses; when every chunk has paused there, the barrier's action runs
    once and the chunks resume in order. Greenlets, not threads: every torch op stays on the
    calling thread and its OpenMP pool (worker threads made each op about 2x slower here), and
    an exception, KeyboardInterrupt included, surfaces in the caller. Thread-local torch state
    (grad mode, autocast) is shared by the chunks: a context entered inside a block's forward
    around a barrier would leak to the other chunks; the supported blocks enter none."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._action: Callable[[], None] | None = None

    def barrier(self, action: Callable[[], None]) -> None:
        self._action = action
        greenlet.getcurrent().parent.switch()

    def run(self, work: Callable[[int], None]) -> None:
        chunks = [greenlet.greenlet(lambda i=i: work(i)) for i in range(self.n)]
        try:
            while chunks:
                self._action = None
                for g in chunks:
                    g.switch()
                alive = [g for g in chunks if not g.dead]
                if self._action is not None:
                    if len(alive) != len(chunks):
                        raise RuntimeError("chunks disagree on the barriers of a block forward")
                    self._action()
                chunks = alive
        finally:
            for g in chunks:
                if not g.dead:
                    g.throw(greenlet.GreenletExit)


class LayerWalker:
    """Walks the blocks of ``model`` (found through ``adapter``), compressing the Linears each
    step selects. ``steps`` are ``(index, Step, compressor)`` in recipe order."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        steps: list[tuple[int, Any, Any]],
        config: WalkerConfig,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.steps = steps
        self.config = config
        self.progress = progress
        self.device = next(model.parameters()).device
        self.report = WalkReport()
        self._teacher_hidden: Tensor | None = None

    # -- capture -------------------------------------------------------------------------
    def capture(self, windows: Tensor) -> tuple[Tensor, list[dict[int, tuple[tuple, dict]]]]:
        """Block-0 inputs for all windows ([S, T, d] in the forward dtype, CPU) and, for each
        block, its positional/keyword arguments per chunk size."""
        blocks = self.adapter.get_blocks(self.model)
        originals = list(blocks)
        S = windows.shape[0]
        sink: dict[str, Any] = {"cache": None, "samples": S, "dtype": self.config.torch_dtype,
                                "start": 0, "last": len(blocks) - 1,
                                "kwargs": [{} for _ in blocks]}
        bs = self.config.batch_size
        try:
            for i in range(len(blocks)):
                blocks[i] = _Recorder(i, sink)
            with torch.no_grad():
                for start in range(0, S, bs):
                    sink["start"] = start
                    try:
                        self.model(input_ids=windows[start : start + bs].to(self.device),
                                   use_cache=False)
                    except _Stop:
                        pass
        finally:
            for i, b in enumerate(originals):
                blocks[i] = b
        return sink["cache"], sink["kwargs"]

    # -- per block -------------------------------------------------------------------------
    def _groups(
        self, block_index: int, linears: dict[str, nn.Linear], steps: list
    ) -> list[list[str]]:
        """Targeted Linears (relative names) grouped by shared input, in execution order."""
        prefix = f"{self.adapter.blocks}.{block_index}."
        targeted = {n for n in linears if any(s.selects(prefix + n) for _, s, _ in steps)}
        groups = [[n for n in g if n in targeted] for g in self.adapter.groups]
        covered = {n for g in groups for n in g}
        groups += [[n] for n in linears if n in targeted and n not in covered]
        return [g for g in groups if g]

    def _compress_group(
        self, block_index: int, group: list[str], masters: dict[str, nn.Linear],
        copies: dict[str, nn.Linear], stats: dict[tuple[int, str], Any], steps: list,
    ) -> None:
        prefix = f"{self.adapter.blocks}.{block_index}."
        for idx, step, comp in steps:
            for n in group:
                full = prefix + n
                if not step.selects(full):
                    continue
                master = masters[n]
                st = stats.get((id(group), comp.stats_kind)) if comp.stats_kind else None
                mask = getattr(master, "llmc_mask", None)
                res = comp.compress(full, master.weight.data, st, mask=mask)
                master.weight.data.copy_(res.weight.to(master.weight.dtype))
                if copies[n] is not master:
                    copies[n].weight.data.copy_(res.weight.to(copies[n].weight.dtype))
                if res.quant is not None:
                    master.llmc_quant = res.quant.state()  # qparams; writers recover the codes
                sparsity = None
                if res.mask is not None:
                    # Later steps of this block keep these zeros; dropped after the block.
                    master.llmc_mask = res.mask
                    sparsity = 1.0 - float(res.mask.float().mean())
                    master.llmc_sparsity = {"structure": step.config.structure,
                                            "sparsity": sparsity}
                elif mask is not None:
                    sparsity = master.llmc_sparsity["sparsity"]
                self.report.layers.append(LayerRecord(
                    full, idx, step.method, tuple(master.weight.shape), res.error, res.seconds,
                    sparsity,
                ))
        for key in [k for k in stats if k[0] == id(group)]:
            del stats[key]

    def _new_stats(
        self, groups: list[list[str]], linears: dict[str, nn.Linear], steps: list
    ) -> dict:
        stats: dict[tuple[int, str], Any] = {}
        for g in groups:
            for _, _, comp in steps:
                if comp.needs_calibration and comp.stats_kind:
                    key = (id(g), comp.stats_kind)
                    if key not in stats:
                        stats[key] = comp.new_stats(linears[g[0]].in_features)
        return stats

    def _phases(self) -> list[tuple[str, list]]:
        """Consecutive recipe steps of one kind: block transforms (rewrite the whole block from
        its cached inputs) and Linear compressors (one walk through the block)."""
        phases: list[tuple[str, list]] = []
        for item in self.steps:
            kind = "transform" if hasattr(item[2], "transform") else "linear"
            if phases and phases[-1][0] == kind and kind == "linear":
                phases[-1][1].append(item)
            else:
                phases.append((kind, [item]))
        return phases

    def run_block(
        self, block_index: int, block: nn.Module, hidden: Tensor,
        block_args: dict[int, tuple[tuple, dict]],
    ) -> Tensor:
        """Compress one block; returns its outputs on the compressed weights."""
        ctx = self._context(block_index, block, hidden, block_args)
        if self._teacher_hidden is not None:
            ctx.teacher = copy.deepcopy(block)
            ctx.inputs = hidden.clone()
            ctx.teacher_hidden = self._teacher_hidden
        stored = False
        for kind, steps in self._phases():
            if kind == "transform":
                for idx, step, comp in steps:
                    record = comp.transform(ctx, step)
                    self.report.transforms.append(
                        {"block": block_index, "step": idx, "method": step.method, **record}
                    )
                    # A step that rewrote ctx.hidden with the block's outputs says so.
                    stored = bool(getattr(comp, "stores_outputs", False))
            else:
                self._linear_phase(ctx, steps)
                stored = True
        if not stored:  # a transform came last: the next block needs this one's outputs
            ctx.forward(ctx.forward_copy(), store=True)
        _drop_masks(block)
        return hidden

    def _linear_phase(self, ctx: BlockContext, steps: list) -> None:
        """Compress the Linears that ``steps`` target; ``ctx.hidden`` becomes the block's
        outputs on the compressed weights."""
        block_index, block, dtype = ctx.index, ctx.block, ctx.dtype
        masters = block_linears(block)
        groups = self._groups(block_index, masters, steps)
        fwd = block if dtype == torch.float32 else copy.deepcopy(block).to(dtype)
        copies = block_linears(fwd)
        stats = self._new_stats(groups, masters, steps)
        group_of = {n: g for g in groups for n in g}
        calibrating = any(c.needs_calibration for _, _, c in steps)
        sequential = calibrating and all(
            c.sequential for _, _, c in steps if c.needs_calibration
        )
        n_chunks = ctx.n_chunks
        done: set[int] = set()
        lockstep = _Lockstep(n_chunks)
        # The tail (down_proj in llama-like blocks) is the last group and lands straight on the
        # residual: during the pass it adds its inputs to the statistics, keeps them and returns
        # zeros, so each chunk's forward finishes (freeing its call stack) with the residual as
        # output; once compressed, the tail's outputs are added to the stored residuals.
        tail = self.adapter.tail if sequential and groups and groups[-1] == [
            self.adapter.tail] else None
        tail_inputs: dict[int, Tensor] = {}
        chunk_of: dict[Any, int] = {}
        hidden, bs = ctx.hidden, ctx.batch_size

        def forward_chunk(c: int, store: bool = True) -> None:
            chunk_of[greenlet.getcurrent()] = c
            ctx.forward_chunk(fwd, c, store)

        def compress(group: list[str]) -> None:
            self._compress_group(block_index, group, masters, copies, stats, steps)
            done.add(id(group))

        def feed(group: list[str], x: Tensor) -> None:
            for (gid, _), st in stats.items():
                if gid == id(group):
                    st.add_batch(x)

        def hook_for(name: str):
            group = group_of[name]

            def pre_hook(module: nn.Module, inputs: tuple) -> None:
                if id(group) in done or name != group[0]:
                    return
                feed(group, inputs[0])
                if sequential:
                    lockstep.barrier(lambda: compress(group))

            return pre_hook

        def tail_forward(x: Tensor) -> Tensor:
            feed(groups[-1], x)
            tail_inputs[chunk_of[greenlet.getcurrent()]] = x
            return x.new_zeros(*x.shape[:-1], copies[tail].out_features)

        handles = []
        if calibrating:
            # Members of a group read the same input: the first member's hook speaks for all.
            for g in groups:
                if g[0] != tail:
                    handles.append(copies[g[0]].register_forward_pre_hook(hook_for(g[0])))
        try:
            if sequential:
                with replaced_forward(copies.get(tail), tail_forward), torch.no_grad():
                    lockstep.run(forward_chunk)
                if tail is not None:
                    compress(groups[-1])
                    with torch.no_grad():
                        for c in sorted(tail_inputs):
                            y = copies[tail](tail_inputs.pop(c))
                            hidden[c * bs : c * bs + y.shape[0]] += y.to("cpu", hidden.dtype)
            else:
                if calibrating:
                    with torch.no_grad():
                        for c in range(n_chunks):
                            forward_chunk(c, store=False)
                for h in handles:
                    h.remove()
                handles = []
                for g in groups:
                    compress(g)
                with torch.no_grad():
                    for c in range(n_chunks):
                        forward_chunk(c)
        finally:
            for h in handles:
                h.remove()
        missing = [g for g in groups if id(g) not in done]
        if missing:
            raise ValueError(
                f"block {block_index}: the Linears {missing} were never called during the forward "
                "pass; exclude them with the step's `ignore`"
            )

    def compress_without_data(self) -> None:
        """Every step needs no data (e.g. RTN): compress each targeted Linear directly."""
        blocks = self.adapter.get_blocks(self.model)
        for b, block in enumerate(self._bar(blocks)):
            t = time.perf_counter()
            masters = block_linears(block)
            for g in self._groups(b, masters, self.steps):
                self._compress_group(b, g, masters, masters, {}, self.steps)
            _drop_masks(block)
            self.report.blocks.append({"block": b, "seconds": time.perf_counter() - t})

    def _bar(self, blocks, desc: str = "Compressing blocks"):
        if not self.progress:
            return blocks
        from tqdm.auto import tqdm

        return tqdm(blocks, desc=desc, unit="block")

    def _context(self, b: int, block: nn.Module, hidden: Tensor,
                 block_args: dict[int, tuple[tuple, dict]]) -> BlockContext:
        dtype = self.config.torch_dtype
        return BlockContext(
            b, block, f"{self.adapter.blocks}.{b}.", self.adapter, hidden,
            _cast(block_args, dtype, self.device), self.config.batch_size, dtype, self.device,
        )

    def dense_pass(
        self, hidden: Tensor, block_args: list, visit: Callable[[BlockContext, nn.Module], Any],
        desc: str = "Planning",
    ) -> list[Any]:
        """The calibration windows through the uncompressed blocks in order, on a copy of the
        cached inputs (a planning pass: OWL's outlier ratios). ``visit(ctx, module)`` runs
        before each block's forward, ``module`` being the forward copy that hooks go on, and
        returns a callable run after it; returns their results."""
        h = hidden.clone()
        results = []
        for b, block in enumerate(self._bar(self.adapter.get_blocks(self.model), desc)):
            ctx = self._context(b, block, h, block_args[b])
            module = ctx.forward_copy()
            done = visit(ctx, module)
            ctx.forward(module, store=True)
            results.append(done())
            del module
        return results

    def run(self, windows: Tensor | None) -> WalkReport:
        """Compress every block; ``windows`` ([S, T] token ids) may be None when no step needs
        calibration data."""
        if not any(c.needs_calibration for _, _, c in self.steps):
            self.compress_without_data()
            return self.report
        if windows is None:
            raise ValueError("this recipe needs calibration data")
        t = time.perf_counter()
        hidden, block_args = self.capture(windows)
        self.report.capture_seconds = time.perf_counter() - t
        if any(getattr(c, "needs_teacher", False) for _, _, c in self.steps):
            self._teacher_hidden = hidden.clone()
        for idx, step, comp in self.steps:
            if hasattr(comp, "plan"):
                record = comp.plan(self, hidden, block_args, step)
                if record:
                    self.report.plans.append({"step": idx, "method": step.method, **record})
        blocks = self.adapter.get_blocks(self.model)
        for b, block in enumerate(self._bar(blocks)):
            t = time.perf_counter()
            hidden = self.run_block(b, block, hidden, block_args[b])
            _release_memory()
            self.report.blocks.append({"block": b, "seconds": time.perf_counter() - t})
        del hidden
        self._teacher_hidden = None
        return self.report
