"""Where the blocks live and how one comes onto the compute device.

:class:`ResidentBlocks`: a model already in memory (the in-memory API); a block moves to the
compute device for its turn and back to where it was. :class:`LazyBlocks`: a
:class:`~llmc.models.lazy.LazyModel`; a block is read from its checkpoint onto the device for
its turn and dropped afterwards, and the embeddings exist only during the capture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from llmc.models.adapters import Adapter


def move_block(block: nn.Module, device: torch.device) -> None:
    """``block`` and the quantization states its Linears keep onto ``device``."""
    block.to(device)
    for m in block.modules():
        st = getattr(m, "llmc_quant", None)
        if st is not None:
            for f in ("scales", "zeros", "g_idx"):
                setattr(st, f, getattr(st, f).to(device))
        if getattr(m, "llmc_codes", None) is not None:
            m.llmc_codes = m.llmc_codes.to(device)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class ResidentBlocks:
    """The blocks of a resident ``model``; each visits ``device`` for its turn."""

    lazy = False

    def close(self) -> None:
        pass

    def __init__(self, model: nn.Module, adapter: Adapter, device: torch.device) -> None:
        self.model, self.adapter, self.device = model, adapter, device
        self.blocks = adapter.get_blocks(model)
        self._home: dict[int, torch.device] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, b: int) -> nn.Module:
        block = self.blocks[b]
        home = _device_of(block)
        if home != self.device:
            self._home[b] = home
            move_block(block, self.device)
        return block

    def unload(self, b: int) -> None:
        home = self._home.pop(b, None)
        if home is not None:
            move_block(self.blocks[b], home)

    @contextlib.contextmanager
    def embeddings(self) -> Iterator[nn.Module]:
        """The model, with what runs before block 0 on the compute device."""
        moved = [m for m in _outside_blocks(self.model, self.adapter)
                 if _device_of(m) != self.device]
        homes = [_device_of(m) for m in moved]
        for m in moved:
            m.to(self.device)
        try:
            yield self.model
        finally:
            for m, h in zip(moved, homes):
                m.to(h)


def _outside_blocks(model: nn.Module, adapter: Adapter) -> list[nn.Module]:
    """The leaf-most modules holding parameters outside the blocks, the final norm and the
    head: what the forward needs before block 0 (embeddings, learned positions, input
    projections)."""
    skip = _not_outside(adapter)
    out = []
    for name, m in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if any(True for _ in m.parameters(recurse=False)):
            out.append(m)
    return out


class LazyBlocks:
    """The blocks of a :class:`~llmc.models.lazy.LazyModel`, read onto ``device`` in ``dtype``
    (float32; None: as stored) for their turn and released after it. With ``prefetch``, a
    thread reads block b + 1's tensors (as stored) while block b is worked on."""

    lazy = True

    def __init__(self, lazy: Any, adapter: Adapter, device: torch.device,
                 prefetch: bool = False, dtype: torch.dtype | None = torch.float32) -> None:
        self.lazy, self.adapter, self.device, self.dtype = lazy, adapter, device, dtype
        self.model = lazy.model
        self.blocks = adapter.get_blocks(self.model)
        self._pool = ThreadPoolExecutor(1, "llmc-prefetch") if prefetch else None
        self._ahead: dict[int, Future] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def prefix(self, b: int) -> str:
        return f"{self.adapter.blocks}.{b}."

    def load(self, b: int) -> nn.Module:
        ahead = self._ahead.pop(b, None)
        for stale in self._ahead.values():  # a pass that skipped ahead (none do today)
            stale.cancel()
        self._ahead.clear()
        tensors = ahead.result() if ahead is not None else None
        if self._pool is not None and b + 1 < len(self.blocks):
            self._ahead[b + 1] = self._pool.submit(self.lazy.read, self.prefix(b + 1))
        self.lazy.materialize(self.prefix(b), self.device, dtype=self.dtype, tensors=tensors)
        return self.blocks[b]

    def close(self) -> None:
        for f in self._ahead.values():
            f.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def unload(self, b: int) -> None:
        block = self.blocks[b]
        for m in block.modules():
            for attr in ("llmc_quant", "llmc_codes", "llmc_mask", "llmc_sparsity", "llmc_act"):
                if hasattr(m, attr):
                    delattr(m, attr)
        self.lazy.release(self.prefix(b))

    @contextlib.contextmanager
    def embeddings(self) -> Iterator[nn.Module]:
        """The model with what runs before block 0 read onto the device (not the head or the
        final norm), released afterwards."""
        prefixes = [n + "." for n in _outside_names(self.lazy, self.adapter)]
        try:
            for p in prefixes:
                self.lazy.materialize(p, self.device)
            yield self.model
        finally:
            for p in prefixes:
                self.lazy.release(p)


def _not_outside(adapter: Adapter) -> tuple[str, ...]:
    """The blocks, the final norm (a post-norm model has none) and the head."""
    return tuple(s for s in (adapter.blocks, adapter.norm, adapter.head) if s)


def _outside_names(lazy: Any, adapter: Adapter) -> list[str]:
    """Names of the modules holding parameters outside the blocks, final norm and head."""
    skip = _not_outside(adapter)
    owners = set()
    for name in lazy.parameter_names():
        owner = name.rpartition(".")[0]
        if not any(owner == s or owner.startswith(s + ".") for s in skip):
            owners.add(owner)
    return sorted(owners)
