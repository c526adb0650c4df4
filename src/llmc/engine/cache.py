"""The activation cache: every calibration window's hidden states at the current block, in the
walker's dtype, on the CPU, read and written one chunk of windows at a time.

Two buffers: the block's inputs stay intact while its outputs are written, so any step of the
block can read the inputs again, and a run killed inside a block still has them. ``ram`` keeps
both in memory (pinned under CUDA); ``disk`` keeps them in two files of a directory and holds
only the chunk in use. :meth:`ActivationCache.finish_block` makes the outputs the next
block's inputs; :meth:`ActivationCache.persist` leaves those inputs in a file for a resumed run.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

PLACES = ("ram", "disk")


def _io(fd: int, buf: Tensor, offset: int, write: bool) -> None:
    view = memoryview(buf.reshape(-1).view(torch.uint8).numpy()).cast("B")
    done, step = 0, 1 << 30
    while done < len(view):
        part = view[done : done + step]
        n = os.pwritev(fd, [part], offset + done) if write else os.preadv(fd, [part], offset + done)
        if n <= 0:
            raise OSError(f"short {'write' if write else 'read'} in the activation cache")
        done += n


class ActivationCache:
    """Hidden states [n_windows, seqlen, hidden] in ``dtype``, chunks of ``batch_size``
    windows, kept in ``place`` (``ram`` or ``disk``, files named ``{name}-{0,1}.bin`` in
    ``directory``)."""

    def __init__(self, n_windows: int, seqlen: int, hidden: int, dtype: torch.dtype,
                 batch_size: int, place: str = "ram", directory: Path | None = None,
                 name: str = "hidden", pin: bool = False) -> None:
        if place not in PLACES:
            raise ValueError(f"cache place {place!r} is not one of {PLACES}")
        self.n_windows, self.seqlen, self.hidden = n_windows, seqlen, hidden
        self.dtype, self.batch_size, self.place, self.name = dtype, batch_size, place, name
        self.directory = Path(directory) if directory is not None else None
        self._in = 0
        self._row_bytes = seqlen * hidden * dtype.itemsize
        shape = (n_windows, seqlen, hidden)
        if place == "ram":
            self._bufs = [torch.empty(shape, dtype=dtype, pin_memory=pin) for _ in range(2)]
        else:
            if self.directory is None:
                raise ValueError("a disk cache needs a directory")
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fds = []
            for i in range(2):
                fd = os.open(self.file(i), os.O_RDWR | os.O_CREAT, 0o644)
                os.ftruncate(fd, n_windows * self._row_bytes)
                self._fds.append(fd)

    @property
    def nbytes(self) -> int:
        return self.n_windows * self._row_bytes

    def file(self, i: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{self.name}-{i}.bin"

    def _rows(self, c: int) -> tuple[int, int]:
        a = c * self.batch_size
        return a, min(a + self.batch_size, self.n_windows)

    def _get(self, side: int, c: int) -> Tensor:
        a, b = self._rows(c)
        if self.place == "ram":
            return self._bufs[side][a:b]
        out = torch.empty((b - a, self.seqlen, self.hidden), dtype=self.dtype)
        _io(self._fds[side], out, a * self._row_bytes, write=False)
        return out

    def read(self, c: int) -> Tensor:
        """Chunk ``c`` of the block's inputs (a view in RAM: do not modify)."""
        return self._get(self._in, c)

    def read_output(self, c: int) -> Tensor:
        """Chunk ``c`` of the outputs written so far."""
        return self._get(1 - self._in, c)

    def write(self, c: int, value: Tensor) -> None:
        """Chunk ``c`` of the block's outputs."""
        a, b = self._rows(c)
        if value.shape != (b - a, self.seqlen, self.hidden):
            raise ValueError(f"chunk {c}: expected outputs of shape "
                             f"{(b - a, self.seqlen, self.hidden)}, got {tuple(value.shape)}")
        if self.place == "ram":
            self._bufs[1 - self._in][a:b].copy_(value)
        else:
            v = value.detach().to("cpu", self.dtype).contiguous()
            _io(self._fds[1 - self._in], v, a * self._row_bytes, write=True)

    def finish_block(self) -> None:
        """The outputs become the inputs of the next block."""
        self._in = 1 - self._in

    def copy_inputs_from(self, other: ActivationCache) -> None:
        """This cache's inputs become a copy of ``other``'s inputs."""
        for c in range(-(-self.n_windows // self.batch_size)):
            self.write(c, other.read(c))
        self.finish_block()

    def persist(self, directory: Path, tag: int) -> Path:
        """Leave the current inputs in a file, flushed to disk, and return its path: a disk
        cache's own input file, or for a RAM cache a file of ``directory`` (``tag`` alternates
        it, so that the previous one stays whole meanwhile)."""
        if self.place == "disk":
            os.fsync(self._fds[self._in])
            return self.file(self._in).resolve()
        path = (directory / f"{self.name}-snapshot-{tag % 2}.bin").resolve()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_inputs(fd, 0)
        finally:
            os.close(fd)
        return path

    def persist_part(self, path: Path, first: int, total: int) -> None:
        """Write the current inputs as windows ``first, first + 1, ...`` of a file that holds
        ``total`` windows (this process's share of a distributed run's state), flushed to
        disk. Every rank writes its own rows of the same file; none truncates the others'."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, total * self._row_bytes)
            self._write_inputs(fd, first)
        finally:
            os.close(fd)

    def _write_inputs(self, fd: int, first: int) -> None:
        """The current inputs into ``fd`` from window ``first`` on, flushed to disk."""
        for c in range(-(-self.n_windows // self.batch_size)):
            a, _ = self._rows(c)
            _io(fd, self.read(c).contiguous(), (first + a) * self._row_bytes, write=True)
        os.fsync(fd)

    def restore(self, path: Path, first: int = 0, total: int | None = None) -> None:
        """The inputs become the contents of ``path`` (written by :meth:`persist`), or of its
        windows ``first, first + 1, ...`` when it holds ``total`` windows (a distributed run's
        state, or a resumed run over several processes)."""
        expected = (self.n_windows if total is None else total) * self._row_bytes
        if not path.is_file() or path.stat().st_size != expected:
            raise ValueError(f"{path}: the saved activations are missing or truncated; the "
                             "partial run cannot be resumed (remove it and start again)")
        if self.place == "disk" and total is None and path.resolve() in (
                self.file(0).resolve(), self.file(1).resolve()):
            self._in = 0 if path.resolve() == self.file(0).resolve() else 1
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            for c in range(-(-self.n_windows // self.batch_size)):
                a, b = self._rows(c)
                buf = torch.empty((b - a, self.seqlen, self.hidden), dtype=self.dtype)
                _io(fd, buf, (first + a) * self._row_bytes, write=False)
                self.write(c, buf)
        finally:
            os.close(fd)
        self.finish_block()

    def close(self) -> None:
        if self.place == "disk":
            for fd in self._fds:
                os.close(fd)
            self._fds = []
        else:
            self._bufs = []
