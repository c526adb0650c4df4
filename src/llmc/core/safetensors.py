"""The safetensors file format, read one tensor at a time and written one tensor at a time.

A file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (``{name: {dtype,
shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, padded with spaces), then the
tensors' bytes, offsets counted from the end of the header, with no holes.

The ``safetensors`` package maps a whole file, whose touched pages count as the process's
resident memory until the map closes, and its writer builds every tensor's bytes in memory
first. Here a tensor is read with ``preadv`` straight into the tensor that will hold it
(:meth:`SafetensorsFile.read`), or mapped on its own (:meth:`SafetensorsFile.map`: a private
map of just its bytes, released with the tensor), and written straight from its storage, so a
13 GB checkpoint streams through a process whose resident memory stays at one block. A mapped
read costs a sixth of the CPU time of ``preadv`` (measured: 0.17 s against 1.2 s for 2 GB read
cold), which on a machine with few cores is time the compression gets back. Nothing is ever
unpickled: the header is JSON.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20
_IO_CHUNK = 1 << 30  # Linux reads and writes at most ~2 GiB per call
_MADV_POPULATE_READ = 22  # Linux 5.14: fault a range in (reading it) in one call


class SafetensorsFile:
    """The header of one ``.safetensors`` file, checked against the file's size on opening (a
    truncated or corrupt file is refused with its name), and reads of single tensors."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path} does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path} is truncated ({size} bytes): not a safetensors "
                                 "file; download or copy it again")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"{self.path} is truncated or not a safetensors file (its header "
                                 f"claims {n} bytes, the file has {size}); download or copy it "
                                 "again")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: the safetensors header is not valid JSON ({e}); "
                                 "download or copy the file again") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, dict[str, Any]] = header
        end = 0
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name} has dtype {e.get('dtype')!r}, which "
                                 f"llmc cannot read (readable: {', '.join(DTYPES)})")
            a, b = e["data_offsets"]
            if b - a != _numel(e["shape"]) * DTYPES[e["dtype"]].itemsize:
                raise ValueError(f"{self.path}: tensor {name}'s offsets do not match its shape "
                                 "and dtype; the file is corrupt")
            end = max(end, b)
        if self.data_start + end > size:
            raise ValueError(
                f"{self.path} is truncated: its header describes {self.data_start + end} bytes "
                f"but the file has {size}; download or copy it again"
            )

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def nbytes(self, name: str) -> int:
        a, b = self.entries[name]["data_offsets"]
        return b - a

    def read(self, name: str) -> Tensor:
        """Tensor ``name`` on the CPU in its stored dtype, read into fresh memory."""
        e = self.entries[name]
        a, b = e["data_offsets"]
        buf = torch.empty(b - a, dtype=torch.uint8)
        if b > a:
            with open(self.path, "rb", buffering=0) as f:
                _read_into(f.fileno(), buf.numpy(), self.data_start + a, self.path)
        return buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])

    def map(self, name: str) -> Tensor:
        """Tensor ``name`` as :meth:`read` gives it, backed by a private (copy-on-write) map of
        its bytes alone, read in before returning; the map closes when the tensor is freed.
        Writing to the tensor never touches the file."""
        e = self.entries[name]
        a, b = e["data_offsets"]
        if b == a:
            return self.read(name)
        begin, end = self.data_start + a, self.data_start + b
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            m = mmap.mmap(f.fileno(), end - start, access=mmap.ACCESS_COPY, offset=start)
        buf = torch.frombuffer(m, dtype=torch.uint8, count=end - begin, offset=begin - start)
        _populate(m, buf)
        return buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])

    def drop_cache(self, name: str) -> None:
        """Tell the kernel that tensor ``name``'s cached pages will not be read again."""
        a, b = self.entries[name]["data_offsets"]
        drop_cache(self.path, self.data_start + a, b - a)


def drop_cache(path: Path, offset: int, length: int) -> None:
    """Evict ``length`` bytes of ``path`` from ``offset`` out of the page cache (clean pages
    only; a no-op where the OS has no ``posix_fadvise``). A streamed checkpoint is read once:
    its pages, freed as the walk moves on, are the memory the next block's pages reuse."""
    if length <= 0 or not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _dont_need(fd, offset, length)
    finally:
        os.close(fd)


def _dont_need(fd: int, offset: int, length: int) -> None:
    """``posix_fadvise(DONTNEED)`` where the OS has it (``length`` 0: to the end)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _populate(m: mmap.mmap, buf: Tensor) -> None:
    """Read a fresh map's pages in now (in the calling thread: a prefetch thread reads ahead)."""
    if sys.platform.startswith("linux"):
        try:
            m.madvise(_MADV_POPULATE_READ)
            return
        except (OSError, ValueError):  # an older kernel
            pass
    m.madvise(mmap.MADV_WILLNEED)
    int(buf[:: mmap.PAGESIZE].sum())  # one byte of every page


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _read_into(fd: int, out: Any, offset: int, path: Path) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done : done + _IO_CHUNK]], offset + done)
        if got <= 0:
            raise ValueError(f"{path}: unexpected end of file; download or copy it again")
        done += got


def _header_bytes(entries: dict[str, dict[str, Any]], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def write_file(path: str | os.PathLike[str], tensors: dict[str, Tensor],
               metadata: dict[str, str] | None = None, durable: bool = False) -> int:
    """Write ``tensors`` (in their order) to ``path``, each straight from its storage; returns
    the bytes of tensor data. Tensors may share storage (each is written on its own).
    ``durable``: on the disk before returning (``fdatasync``), and then out of the page cache,
    as a streamed output's pieces are written once and not read again soon."""
    entries, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
        n = t.numel() * t.element_size()
        entries[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + n]}
        offset += n
    with open(path, "wb") as f:
        f.write(_header_bytes(entries, metadata))
        for t in tensors.values():
            if t.numel():
                view = _tensor_bytes(t)
                for i in range(0, len(view), _IO_CHUNK):
                    f.write(view[i : i + _IO_CHUNK])
        if durable:
            f.flush()
            os.fdatasync(f.fileno())
            _dont_need(f.fileno(), 0, 0)
    return offset


def concatenate(path: str | os.PathLike[str], sources: list[SafetensorsFile],
                metadata: dict[str, str] | None = None) -> int:
    """One file holding every tensor of ``sources`` (names must not repeat), copied range by
    range: memory does not grow with the files' size. Returns the bytes of tensor data."""
    entries, offset, ranges = {}, 0, []
    for src in sources:
        for name, e in sorted(src.entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if name in entries:
                raise ValueError(f"tensor {name} is in two of the files being joined")
            a, b = e["data_offsets"]
            entries[name] = {"dtype": e["dtype"], "shape": e["shape"],
                             "data_offsets": [offset, offset + b - a]}
            ranges.append((src, a, b))
            offset += b - a
    with open(path, "wb") as out:
        out.write(_header_bytes(entries, metadata))
        for src, a, b in ranges:
            with open(src.path, "rb") as f:
                f.seek(src.data_start + a)
                left = b - a
                while left:
                    chunk = f.read(min(left, 64 * 2**20))
                    if not chunk:
                        raise ValueError(f"{src.path}: unexpected end of file")
                    out.write(chunk)
                    left -= len(chunk)
    return offset
