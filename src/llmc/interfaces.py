"""What the engine hands the methods: the typed :class:`BlockContext` of one block, the
:class:`ModelPass` a planning step runs, and the plug-in kinds as Protocols.

A method sees a block through its context: the float32 masters on the compute device, its
cached inputs chunk by chunk, a way to run it, and where its outputs go. It never moves tensors
between devices itself and never imports the engine.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from llmc.core.tree import cast_floats, first_tensor

BlockArgs = dict[int, tuple[tuple, dict]]
"""A block's positional and keyword arguments (besides the hidden states), per chunk size."""


class Activations(Protocol):
    """A block's inputs and outputs for the calibration windows, chunk by chunk, on the CPU:
    ``read(c)`` the inputs of chunk c, ``write(c, y)`` its outputs, ``read_output(c)`` what was
    written. Inputs stay readable until the block is done."""

    n_windows: int
    seqlen: int
    batch_size: int

    def read(self, c: int) -> Tensor: ...

    def write(self, c: int, value: Tensor) -> None: ...

    def read_output(self, c: int) -> Tensor: ...


@dataclass
class BlockContext:
    """One block as a method sees it: ``block`` (float32 masters on ``device``), its cached
    inputs and where its outputs go (``cache``), its arguments per chunk size (``args``, in the
    forward ``dtype`` on ``device``), ``batch_size`` windows per chunk.

    For steps that learn from the uncompressed model (block-wise distillation): ``teacher`` is
    the block as it was before this block's steps, and ``teacher_cache`` the uncompressed
    model's own hidden states at this block (inputs; the step writes the teacher's outputs)."""

    index: int
    block: nn.Module
    prefix: str
    adapter: Any
    cache: Activations
    args: BlockArgs
    batch_size: int
    dtype: torch.dtype
    device: torch.device
    raw_args: BlockArgs = field(default_factory=dict)
    teacher: nn.Module | None = None
    teacher_cache: Activations | None = None
    # MoE: an expert whose Linears saw fewer calibration rows than this gets a method's
    # data-free fallback (WalkerConfig.min_expert_tokens)
    min_tokens: int = 0
    # a context manager factory the storing passes run in (the walker's KV-cache observer)
    store_scope: Callable[[], Any] | None = None
    # Over several processes: this rank (a Distributed), the index among every rank's chunks
    # of its own first chunk, the windows of all ranks together, and whether the statistics
    # are summed exactly (float64), so that a step can choose as one process would.
    dist: Any = None
    first_chunk: int = 0
    all_windows: int | None = None
    exact_stats: bool = False

    @property
    def total_windows(self) -> int:
        """The calibration windows of every rank together (this one's alone in one process)."""
        return self.n_windows if self.all_windows is None else self.all_windows

    @property
    def total_chunks(self) -> int:
        """The chunks of every rank together (this one's in one process)."""
        return -(-self.total_windows // self.batch_size)

    @property
    def n_windows(self) -> int:
        return self.cache.n_windows

    @property
    def seqlen(self) -> int:
        return self.cache.seqlen

    @property
    def n_chunks(self) -> int:
        return -(-self.n_windows // self.batch_size)

    def chunk_windows(self, c: int) -> int:
        """How many windows chunk ``c`` holds (the last may be short)."""
        return min(self.batch_size, self.n_windows - c * self.batch_size)

    def inputs(self, c: int, dtype: torch.dtype | None = None) -> Tensor:
        """Chunk ``c``'s inputs [n, T, d] on the device (``dtype``: the forward dtype)."""
        return self.cache.read(c).to(self.device, dtype or self.dtype, non_blocking=True)

    def outputs(self, c: int) -> Tensor:
        return self.cache.read_output(c).to(self.device, non_blocking=True)

    def store(self, c: int, out: Tensor) -> None:
        """Chunk ``c``'s outputs (any device) become its entry in the outputs."""
        self.cache.write(c, out.detach())

    def args_as(self, dtype: torch.dtype) -> BlockArgs:
        """The block's arguments with floating tensors in ``dtype`` on the device."""
        return {n: cast_floats(a, dtype, self.device) for n, a in self.raw_args.items()}

    def forward_copy(self) -> nn.Module:
        """A copy of the block in the forward dtype, free to modify."""
        return copy.deepcopy(self.block).to(self.dtype)

    def run(self, module: nn.Module, c: int, x: Tensor | None = None,
            args: BlockArgs | None = None) -> Tensor:
        """``module``'s main output on chunk ``c``'s inputs (or ``x``)."""
        x = self.inputs(c) if x is None else x
        a, kw = (args or self.args)[x.shape[0]]
        return first_tensor(module(x, *a, **kw))

    def forward_chunk(self, module: nn.Module, c: int, store: bool = False) -> None:
        """Chunk ``c`` through ``module``; with ``store``, its outputs become the block's (the
        pass the final weights run, inside :attr:`store_scope`)."""
        if store and self.store_scope is not None:
            with self.store_scope():
                out = self.run(module, c)
        else:
            out = self.run(module, c)
        if store:
            self.store(c, out)

    def forward(self, module: nn.Module, store: bool = False,
                before: Callable[[int], None] | None = None) -> None:
        """Every chunk through ``module``; ``before(c)`` runs ahead of chunk c."""
        with torch.no_grad():
            for c in range(self.n_chunks):
                if before is not None:
                    before(c)
                self.forward_chunk(module, c, store)

    @staticmethod
    @contextlib.contextmanager
    def replaced_forward(module: nn.Module | None,
                         forward: Callable[..., Any]) -> Iterator[None]:
        """``module`` computes ``forward`` instead of its own inside the block (hooks still
        run); nothing happens for ``module=None``."""
        if module is None:
            yield
            return
        module.forward = forward  # an instance attribute shadows the class's method
        try:
            yield
        finally:
            del module.forward


class ModelPass(Protocol):
    """A pass of the calibration windows through the uncompressed blocks, for a planning
    step (OWL's outlier ratios): ``visit(ctx, module)`` runs before each block's forward
    (``module``: the forward copy hooks go on) and returns a callable run after it; the pass
    returns their results. ``prefix(b)`` is block b's name prefix. Statistics a visit keeps
    go through ``prepare`` when made and ``reduce`` before they are read (a run over several
    processes sums them over the ranks)."""

    def dense_pass(self, visit: Callable[[BlockContext, nn.Module], Callable[[], Any]],
                   desc: str = "Planning") -> list[Any]: ...

    def prefix(self, b: int) -> str: ...

    def prepare(self, stats: Any) -> Any: ...

    def reduce(self, stats: Any) -> None: ...


@dataclass
class CompressResult:
    """The new dense weight [N, K] (fp32; None from :meth:`CodesCompressor.compress_codes`),
    its integer form when quantized, its keep mask when pruned, and the relative layer-output
    error ``tr(dW H dW^T) / tr(W H W^T)`` when a Hessian is known."""

    weight: Tensor | None
    quant: Any = None
    error: float | None = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    mask: Tensor | None = None


class Stats(Protocol):
    def add_batch(self, inp: Tensor) -> None: ...


# The kinds the engine dispatches on (each method class names its kind by subclassing one of
# the Protocols below; ``kind`` says which).
LINEAR, TRANSFORM, MODEL = "linear", "transform", "model"


class LinearCompressor(Protocol):
    """RTN, GPTQ, SparseGPT, Wanda, magnitude: statistics of each Linear group's inputs, then
    one weight at a time. ``sequential``: each group sees inputs through the compressed groups
    before it; ``stats_kind``: methods with equal kinds share one statistics object."""

    kind: ClassVar[str] = LINEAR
    needs_calibration: bool
    sequential: bool = False
    stats_kind: str | None = None

    def new_stats(self, in_features: int) -> Stats | None: ...

    def compress(self, name: str, weight: Tensor, stats: Stats | None,
                 mask: Tensor | None = None) -> CompressResult:
        """``mask``: the keep mask of an earlier pruning step (its zeros must stay zero)."""
        ...


@runtime_checkable
class CodesCompressor(Protocol):
    """A data-free quantizer that gives its codes without the dequantized weight (RTN). A
    streamed walk with no forwards (every step data-free) asks for them where the step is the
    last to touch a Linear, since its writer needs nothing else; with one such step and no
    other, the blocks are read in the checkpoint's own dtype, never cast to float32."""

    def compress_codes(self, name: str, weight: Tensor,
                       mask: Tensor | None = None) -> CompressResult: ...


class BlockTransform(Protocol):
    """A step that rewrites a whole block from its cached inputs (AWQ's scales, block-wise
    distillation): ``transform`` changes the block's float32 weights and returns a JSON-able
    record for the report. ``check_model`` refuses an architecture or config before anything
    loads."""

    kind: ClassVar[str] = TRANSFORM
    needs_calibration: bool = True
    stores_outputs: bool = False  # the transform leaves the block's outputs in the cache
    needs_teacher: bool = False  # it needs the uncompressed block and hidden states
    # it runs over several processes: it reduces what it learns from its chunks over the ranks
    # (``ctx.dist``) so that every rank makes the choice one process would make
    distributed: bool = False

    def check_model(self, config: Any, adapter: Any) -> None: ...

    def transform(self, ctx: BlockContext, step: Any) -> dict[str, Any]: ...


@runtime_checkable
class Planner(Protocol):
    """A step that also plans from a pass through the uncompressed model before the walk
    (OWL), and takes its plan back from a resumed run's report."""

    def plan(self, passes: ModelPass, step: Any) -> dict[str, Any]: ...

    def restore_plan(self, passes: ModelPass, record: dict[str, Any]) -> None: ...


class WholeModelStep(Protocol):
    """A step that needs the whole model after the walk (logit distillation)."""

    kind: ClassVar[str] = MODEL
    post_walk: bool = True

    def run(self, student: nn.Module, teacher: nn.Module, train: Tensor, heldout: Tensor,
            step: Any, progress: bool = True) -> dict[str, Any]: ...
