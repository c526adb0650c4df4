"""What memory this process uses and may use: resident set (now and peak), the machine's
available memory, a cgroup's limit, and handing freed heap pages back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable
from pathlib import Path


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """This process's resident set size now (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def available_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo: what the machine can give without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


_NO_LIMIT = 1 << 60


def cgroup_limit_bytes() -> tuple[int, int] | None:
    """(limit, usage) of the memory cgroup this process runs in (v2 ``memory.max``, or v1
    ``memory.limit_in_bytes``, the tightest along the path), or None when unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, files = Path("/sys/fs/cgroup"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, files = Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes",
                                                          "memory.usage_in_bytes")
        else:
            continue
        d = base / path.lstrip("/")
        while True:
            limit = _read_int(d / files[0])
            if limit is not None and limit < _NO_LIMIT:
                usage = _read_int(d / files[1]) or 0
                if best is None or limit - usage < best[0] - best[1]:
                    best = (limit, usage)
            if d == base or base not in d.parents:
                break
            d = d.parent
    return best


def _read_int(p: Path) -> int | None:
    try:
        text = p.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def memory_budget() -> tuple[int, str]:
    """What this process may grow to: the memory available now plus what it already holds,
    capped by its cgroup's limit; with where the figure comes from."""
    own = rss_bytes()
    avail = available_bytes()
    budget, source = (avail + own, "available memory") if avail is not None else (_NO_LIMIT, "")
    cg = cgroup_limit_bytes()
    if cg is not None:
        limit, usage = cg
        # the cgroup's page cache counts in its usage but is given back before an OOM kill
        room = limit - max(usage - own, 0)
        if room < budget:
            budget, source = room, f"the cgroup's limit of {limit / 2**30:.2f} GiB"
    return budget, source


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``): between blocks the
    freed activations of the last one are scattered through the heap, and without this the RSS
    keeps them."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def parse_bytes(text: str | int) -> int:
    """``48GiB``, ``500MB``, ``1.5G`` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower().replace(" ", "")
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "kib": 2**10, "tb": 10**12,
             "gb": 10**9, "mb": 10**6, "kb": 10**3, "t": 2**40, "g": 2**30, "m": 2**20,
             "k": 2**10, "b": 1}
    unit = next((u for u in units if s.endswith(u)), "")
    number, factor = (s[: -len(unit)], units[unit]) if unit else (s, 1)
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as an amount of memory; write e.g. 48GiB, "
                         "500MiB or a number of bytes") from None
    if value <= 0:
        raise ValueError(f"{text!r}: the amount must be positive")
    return int(value * factor)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
