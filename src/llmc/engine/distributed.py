"""One compression over many processes, through ``torch.distributed``.

Data parallel: the calibration windows are split across the ranks in whole chunks of
``batch_size`` windows (so every window is batched with the same windows it would be batched
with in one process), and each rank keeps the activation cache of its own chunks and runs their
forwards. At each Linear group the statistics are summed over the ranks (the Hessian's sums,
Wanda's squared norms, static activation ranges by their maximum), every Linear of the group is
solved by one owner rank (chosen to balance the solve cost, about ``K^2 N``, over the ranks),
and the owner broadcasts what it solved: the weight, codes, scales, zeros and mask. Every rank
then propagates its own windows through the compressed group. Only rank 0 writes the output.

With ``exact`` statistics (:class:`~llmc.core.stats.HessianStats`'s float64 mode) the sums do
not depend on how the chunks are split: each chunk's float32 products are added in float64,
where sums of float32 terms are exact unless the terms of one entry span more than about 2^24
in magnitude; 1, 2 and 3 ranks then give identical checkpoints (``tests/engine``).

The backend is gloo on the CPU and NCCL on CUDA (one device per rank: ``cuda:LOCAL_RANK``). A
process group already initialised by the caller is used as it is; under ``torchrun`` (the
``WORLD_SIZE`` and ``RANK`` variables) llmc initialises it. Collectives time out after
``timeout`` seconds (``LLMC_DIST_TIMEOUT``, default an hour: the largest solve must fit).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 3600.0  # seconds a collective may wait for the slowest rank

_BYTE_VIEWS = {torch.bool: torch.uint8}  # dtypes gloo cannot carry, sent as bytes


def launched() -> bool:
    """Whether this process belongs to a group of several: one the caller initialised, or a
    ``torchrun`` launch (its environment variables)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_seconds() -> float:
    raw = os.environ.get("LLMC_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"LLMC_DIST_TIMEOUT={raw!r}: give the collective timeout in "
                         "seconds, e.g. 3600") from None
    if value <= 0:
        raise ValueError(f"LLMC_DIST_TIMEOUT={raw!r} must be positive")
    return value


def local_device(device: torch.device) -> torch.device:
    """A CUDA rank's own device (``cuda:LOCAL_RANK``) when ``device`` names CUDA without an
    index; otherwise ``device``."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@dataclass
class Distributed:
    """This rank of a process group: ``rank`` of ``world``, tensors communicated on
    ``comm_device``; counts what it communicated (``bytes``) and how long it sat in
    collectives (``wait_seconds``, which includes waiting for the slowest rank)."""

    rank: int
    world: int
    backend: str
    comm_device: torch.device
    timeout: float = DEFAULT_TIMEOUT
    bytes: int = 0
    wait_seconds: float = 0.0
    collectives: int = 0
    load: list[float] = field(default_factory=list)  # solve cost given to each rank so far

    def __post_init__(self) -> None:
        self.load = [0.0] * self.world

    @classmethod
    def connect(cls, device: torch.device) -> Distributed | None:
        """The process group this process belongs to (initialised here under ``torchrun``),
        or None for a single process."""
        import torch.distributed as dist

        if not launched():
            return None
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed; "
                             "run one process")
        timeout = timeout_seconds()
        if not dist.is_initialized():
            _stop_on_sigterm()
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(local_device(device))
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        backend = str(dist.get_backend())
        comm = local_device(device) if backend == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), backend, comm, timeout)

    # -- the split of the calibration windows ------------------------------------------------
    def chunk_range(self, n_chunks: int) -> tuple[int, int]:
        """The chunks ``[a, b)`` this rank works on: contiguous, as even as they go."""
        if n_chunks < self.world:
            raise ValueError(f"{self.world} ranks but only {n_chunks} chunks of calibration "
                             "windows: use fewer ranks, more --samples or a smaller "
                             "--batch-size (each rank needs a chunk)")
        return self._span(self.rank, n_chunks)

    def _span(self, rank: int, n_chunks: int) -> tuple[int, int]:
        return rank * n_chunks // self.world, (rank + 1) * n_chunks // self.world

    def chunk_owner(self, chunk: int, n_chunks: int) -> int:
        """The rank whose :meth:`chunk_range` of ``n_chunks`` holds ``chunk``."""
        return next(r for r in range(self.world)
                    if self._span(r, n_chunks)[0] <= chunk < self._span(r, n_chunks)[1])

    def windows(self, windows: Tensor, batch_size: int) -> Tensor:
        """This rank's rows of the calibration ``windows`` [S, T]."""
        n_chunks = -(-windows.shape[0] // batch_size)
        a, b = self.chunk_range(n_chunks)
        return windows[a * batch_size : b * batch_size]

    # -- collectives --------------------------------------------------------------------------
    def _timed(self, what: str, fn: Any, nbytes: int) -> Any:
        t = time.perf_counter()
        try:
            out = fn()
        except RuntimeError as e:
            raise RuntimeError(f"rank {self.rank} of {self.world}: {what} failed, most likely "
                               f"because another rank stopped (see its output): {e}") from e
        self.wait_seconds += time.perf_counter() - t
        self.bytes += nbytes
        self.collectives += 1
        return out

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """``t`` reduced over the ranks, in place where it can be (returns the result)."""
        import torch.distributed as dist

        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        buf = t if t.device == self.comm_device and t.is_contiguous() else \
            t.contiguous().to(self.comm_device)
        self._timed("all_reduce", lambda: dist.all_reduce(buf, red),
                    buf.numel() * buf.element_size())
        if buf is not t:
            t.copy_(buf.to(t.device))
        return t

    def all_reduce_int(self, n: int, op: str = "sum") -> int:
        return int(self.all_reduce(torch.tensor([n], dtype=torch.int64), op).item())

    def all_gather_int(self, n: int) -> list[int]:
        """Every rank's ``n``, in rank order."""
        t = torch.zeros(self.world, dtype=torch.int64)
        t[self.rank] = n
        return [int(v) for v in self.all_reduce(t).tolist()]

    def broadcast(self, t: Tensor, src: int) -> Tensor:
        import torch.distributed as dist

        buf = t if t.device == self.comm_device else t.to(self.comm_device)
        self._timed("broadcast", lambda: dist.broadcast(buf, src),
                    buf.numel() * buf.element_size())
        if buf is not t:
            t.copy_(buf.to(t.device))
        return t

    def broadcast_json(self, obj: Any, src: int) -> Any:
        """A JSON-able object from ``src`` to every rank (no pickle)."""
        data = json.dumps(obj).encode() if self.rank == src else b""
        n = torch.tensor([len(data)], dtype=torch.int64)
        self.broadcast(n, src)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == src else \
            torch.empty(int(n.item()), dtype=torch.uint8)
        if buf.numel():
            self.broadcast(buf, src)
        return json.loads(bytes(buf.numpy()).decode()) if self.rank != src else obj

    def broadcast_tensors(self, tensors: dict[str, Tensor] | None, meta: Any,
                          src: int) -> tuple[dict[str, Tensor], Any]:
        """Named tensors and a JSON-able ``meta`` from ``src``: a header, then one buffer of
        all their bytes. Other ranks pass ``tensors=None`` and get CPU tensors."""
        if self.rank == src:
            assert tensors is not None
            cpu = {k: v.detach().contiguous().to("cpu") for k, v in tensors.items()}
            header = {"meta": meta, "tensors": [
                [k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in cpu.items()]}
            self.broadcast_json(header, src)
            parts = [_as_bytes(v) for v in cpu.values()]
            if parts:
                self.broadcast(torch.cat(parts), src)
            return cpu, meta
        header = self.broadcast_json(None, src)
        specs = [(k, getattr(torch, d), tuple(s)) for k, d, s in header["tensors"]]
        sizes = [_nbytes(d, s) for _, d, s in specs]
        out: dict[str, Tensor] = {}
        if specs:
            buf = self.broadcast(torch.empty(sum(sizes), dtype=torch.uint8), src)
            offset = 0
            for (k, d, s), n in zip(specs, sizes):
                out[k] = _from_bytes(buf[offset : offset + n], d, s)
                offset += n
        return out, header["meta"]

    def barrier(self) -> None:
        import torch.distributed as dist

        self._timed("barrier", dist.barrier, 0)

    # -- who solves what ----------------------------------------------------------------------
    def owners(self, costs: dict[str, float]) -> dict[str, int]:
        """An owner rank per Linear of one group (``costs``: name -> solve cost), greedy,
        largest first, onto the rank with the least work in this group (then overall): the
        same answer on every rank."""
        in_group = [0.0] * self.world
        owner = {}
        for name in sorted(costs, key=lambda n: (-costs[n], n)):
            r = min(range(self.world), key=lambda i: (in_group[i], self.load[i], i))
            owner[name] = r
            in_group[r] += costs[name]
            self.load[r] += costs[name]
        return owner

    @property
    def ranks_on_machine(self) -> int:
        """Ranks sharing this machine's memory (``LOCAL_WORLD_SIZE`` under torchrun)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world))

    def gather_records(self) -> list[dict[str, Any]]:
        """Every rank's :meth:`record`, on every rank."""
        mine = self.record()
        return [self.broadcast_json(mine if r == self.rank else None, src=r)
                for r in range(self.world)]

    def record(self) -> dict[str, Any]:
        return {"world": self.world, "rank": self.rank, "backend": self.backend,
                "bytes": self.bytes, "collectives": self.collectives,
                "wait_seconds": round(self.wait_seconds, 3),
                "solve_share": [round(x / max(sum(self.load), 1e-30), 4) for x in self.load]}


def _stop_on_sigterm() -> None:
    """torchrun ends the other ranks with SIGTERM when one fails: raise SystemExit instead of
    dying on the spot, so that rank 0 removes its unfinished output on the way out."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _as_bytes(t: Tensor) -> Tensor:
    t = t.to(_BYTE_VIEWS.get(t.dtype, t.dtype))
    return t.reshape(-1).view(torch.uint8)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=_BYTE_VIEWS.get(dtype, dtype)).element_size()


def _from_bytes(buf: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    wire = _BYTE_VIEWS.get(dtype, dtype)
    return buf.clone().view(wire).reshape(shape).to(dtype)


def pack_result(res: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A :class:`~llmc.interfaces.CompressResult` as tensors and JSON (its quantized form's
    scalar fields included) for :meth:`Distributed.broadcast_tensors`."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"error": res.error, "seconds": res.seconds, "info": res.info,
                            "quant": None}
    if res.weight is not None:
        tensors["weight"] = res.weight
    if res.mask is not None:
        tensors["mask"] = res.mask
    if res.quant is not None:
        q = res.quant
        scalars = {}
        for f in fields(q):
            v = getattr(q, f.name)
            if isinstance(v, Tensor):
                tensors[f"quant.{f.name}"] = v
            else:
                scalars[f.name] = v
        meta["quant"] = {"class": type(q).__name__, "fields": scalars}
    return tensors, meta


def unpack_result(tensors: dict[str, Tensor], meta: dict[str, Any], device: torch.device) -> Any:
    from llmc.core.scheme import QuantizedWeight, QuantState
    from llmc.interfaces import CompressResult

    quant = None
    if meta["quant"] is not None:
        cls = {"QuantizedWeight": QuantizedWeight, "QuantState": QuantState}[
            meta["quant"]["class"]]
        parts = {k.removeprefix("quant."): v.to(device) for k, v in tensors.items()
                 if k.startswith("quant.")}
        quant = cls(**parts, **meta["quant"]["fields"])
    weight = tensors.get("weight")
    mask = tensors.get("mask")
    return CompressResult(weight.to(device) if weight is not None else None, quant,
                          meta["error"], meta["seconds"], meta["info"],
                          mask.to(device) if mask is not None else None)
