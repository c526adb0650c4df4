"""Choosing a kernel launch configuration: on CUDA, each config of a short fixed list is timed
once per problem key (GPU time in a CUDA graph with a cold L2: :func:`gpu_time_ms`) and the
fastest is kept for the process (configs that fail to compile, or whose result differs from
the first config's by more than rounding, are skipped); elsewhere (the CPU interpreter) the
first config of the list runs untimed. ``LLMC_TUNE=0`` turns the timing off (the first
config everywhere). Nothing is timed while a CUDA graph is being captured: a key first seen
then takes the first config. ``choices()`` reports what was picked, for the benchmarks."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Config:
    kwargs: dict = field(hash=False)
    num_warps: int = 4
    num_stages: int = 3

    def describe(self) -> str:
        args = " ".join(f"{k}={int(v)}" for k, v in self.kwargs.items())
        if self.kwargs.get("GEMV"):
            args = "GEMV " + " ".join(f"{k}={int(v)}" for k, v in self.kwargs.items()
                                      if k != "GEMV")
        return f"{args} warps={self.num_warps} stages={self.num_stages}"


def gpu_time_ms(fn: Callable[[], object], reps: int = 20, trials: int = 5) -> float:
    """GPU time of one ``fn()`` in ms, as a model step replayed in a CUDA graph sees it: no
    host launch overhead (which would swamp a kernel of a few microseconds), and a cold L2
    holding clean lines, as after the previous layer's weights (each call follows a read of
    256 MB, whose own time is measured alone and subtracted; a write there would leave dirty
    lines whose write-back the timed call would pay). The median of ``trials`` replays of
    ``reps`` calls."""
    flush = torch.ones(128 * 2**20, dtype=torch.float16, device="cuda")
    sink = torch.empty((), dtype=torch.float32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile, allocate, warm libraries up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)

    def capture(with_fn: bool) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                torch.sum(flush, dim=0, dtype=torch.float32, out=sink)
                if with_fn:
                    fn()
        return g

    graphs = capture(True), capture(False)
    diffs = []
    for _ in range(trials):
        ms = []
        for g in graphs:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
        diffs.append((ms[0] - ms[1]) / reps)
    return sorted(diffs)[len(diffs) // 2]


MISMATCH = 2e-2  # relative max error between two configs' outputs that marks one as wrong


def rel_err(y: Tensor, ref: Tensor) -> float:
    """``max |y - ref| / max |ref|``, in float32."""
    y, ref = y.float(), ref.float()
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


_PICKED: dict[tuple, Config] = {}
_TIMES: dict[tuple, list[tuple[str, float | str]]] = {}


def _timing_on(x_is_cuda: bool) -> bool:
    if not x_is_cuda or os.environ.get("LLMC_TUNE", "1") == "0":
        return False
    return not torch.cuda.is_current_stream_capturing()


def pick(key: tuple, configs: list[Config], run: Callable[[Config], Tensor],
         cuda: bool) -> Tensor:
    """Run ``run(config)`` with the config chosen for ``key`` and return its result."""
    cfg = _PICKED.get(key)
    if cfg is not None:
        return run(cfg)
    if not _timing_on(cuda):
        return run(configs[0])
    times: list[tuple[str, float | str]] = []
    best, best_ms, first = None, float("inf"), None
    for c in configs:
        try:
            y = run(c)  # compiles, and checks that it runs and agrees with the first config
            if first is None:
                first = y.float()
            elif y.shape != first.shape:
                raise RuntimeError(f"output shape {tuple(y.shape)} != {tuple(first.shape)}")
            elif (err := rel_err(y, first)) > MISMATCH:
                raise RuntimeError(f"result differs from the first config's by {err:.2e}")
            ms = gpu_time_ms(lambda c=c: run(c), reps=10, trials=3)
        except Exception as e:  # a config this GPU cannot compile or run: skip it
            times.append((c.describe(), f"failed: {type(e).__name__}: {str(e)[:600]}"))
            continue
        times.append((c.describe(), ms))
        if ms < best_ms:
            best, best_ms = c, ms
    if best is None:
        raise RuntimeError(f"no kernel config ran for {key}: {times}")
    _PICKED[key] = best
    _TIMES[key] = times
    return run(best)


def choices() -> dict[str, dict]:
    """Every key tuned so far: the config picked and each candidate's time (ms) or failure."""
    return {repr(k): {"picked": _PICKED[k].describe(), "candidates": _TIMES.get(k, [])}
            for k in _PICKED}


def swap_enabled() -> bool:
    """``LLMC_SWAP=0`` leaves the swapped-operand kernels out of the tuner's lists (a switch
    for a GPU on which they misbehave)."""
    return os.environ.get("LLMC_SWAP", "1") != "0"


# fp16 outputs take split-K partial sums by fp16 atomics (no fp32 buffer and cast launch);
# other dtypes accumulate in an fp32 buffer.
FP16_ATOMICS = os.environ.get("LLMC_FP16_ATOMICS", "1") != "0"


def atomic_out(M: int, N: int, x: Tensor, split: int) -> Tensor:
    """The output buffer of a split-K launch (zeroed for the atomics)."""
    if split == 1:
        return torch.empty(M, N, device=x.device, dtype=x.dtype)
    dtype = x.dtype if (x.dtype == torch.float16 and FP16_ATOMICS) else torch.float32
    return torch.zeros(M, N, device=x.device, dtype=dtype)


def finish_out(out: Tensor, x: Tensor) -> Tensor:
    return out if out.dtype == x.dtype else out.to(x.dtype)
