"""Streaming output and the resume state.

A streaming run writes into ``{parent}/.{name}.llmc-partial``. Each finished block's tensors,
already in the target layout, go to ``blocks/block-NNNNN.safetensors`` the moment the block is
done; at every block boundary ``llmc-state.json`` records the finished blocks, where the next
block's inputs are (the activation cache's file, and the uncompressed model's hidden states
when a step needs them), what the report holds so far, what the checkpoint's config will need,
and a fingerprint of the model files, recipe, calibration windows and llmc version.

A killed run is continued with ``resume=True`` from the first unfinished block, and gives the
tensors an uninterrupted run gives; a changed fingerprint is refused with what changed. When
all blocks are done the rest of the model (embeddings, final norm, head) is written, the pieces
become ``model.safetensors`` (or shards with an index), and the directory is moved into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from llmc.core.safetensors import SafetensorsFile, concatenate, write_file
from llmc.engine.cache import ActivationCache
from llmc.engine.walker import LayerRecord, WalkReport

log = logging.getLogger(__name__)

STATE_FILE = "llmc-state.json"
STATE_VERSION = 1
PARTIAL_SUFFIX = ".llmc-partial"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def partial_dir(out: Path) -> Path:
    """Where a streaming run to ``out`` works until it is complete."""
    return out.parent / f".{out.name}{PARTIAL_SUFFIX}"


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_state(partial: Path) -> dict[str, Any] | None:
    p = partial / STATE_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def describe_partial(partial: Path) -> str:
    """One line on what a leftover partial directory holds."""
    state = read_state(partial)
    if state is None:
        return f"{partial} holds an unfinished run with no resume state (it stopped before its " \
               "first block boundary)"
    n = state.get("n_blocks", "?")
    return (f"{partial} holds an unfinished run: {state['blocks_done']} of {n} blocks done, "
            f"last saved {state.get('updated', '?')}")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def fingerprint_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """What differs between two fingerprints, in words (None when they agree)."""
    names = {"model": "model files", "recipe": "recipe", "calibration": "calibration windows",
             "format": "checkpoint format", "llmc": "llmc version"}
    for key, what in names.items():
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        fa, fb = _flatten(a), _flatten(b)
        diff = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
        detail = f"{diff[0]}: {fa.get(diff[0])!r} -> {fb.get(diff[0])!r}" if diff and diff[0] \
            else f"{a!r} -> {b!r}"
        return f"the {what} changed ({detail})"
    return None


class StreamingCheckpoint:
    """The engine's checkpoint for a streaming run into ``partial``: packs and writes each
    finished block, saves the state at block boundaries, and resumes from it.

    ``lazy``: the :class:`~llmc.models.lazy.LazyModel`; ``packer``: the layout's
    :class:`~llmc.formats.packer.Packer`; ``fingerprint``: what a resumed run must match."""

    def __init__(self, partial: Path, lazy: Any, packer: Any, blocks_prefix: str,
                 n_blocks: int, fingerprint: dict[str, Any], resume: bool,
                 max_shard_bytes: int = 2_000_000_000) -> None:
        self.partial = partial
        self.lazy = lazy
        self.packer = packer
        self.blocks_prefix = blocks_prefix
        self.n_blocks = n_blocks
        self.fingerprint = fingerprint
        self.max_shard_bytes = max_shard_bytes
        self.pieces: dict[int, str] = {}
        self.state: dict[str, Any] | None = None
        self.resumed_from: int | None = None
        if partial.exists():
            if not resume:
                raise ValueError(f"{describe_partial(partial)}; rerun with --resume to continue "
                                 f"it, or remove it (rm -r {partial}) to start again")
            state = read_state(partial)
            if state is None:
                log.info("%s has no resume state; starting again", partial)
                shutil.rmtree(partial)
            else:
                change = fingerprint_change(state["fingerprint"], fingerprint)
                if change:
                    raise ValueError(
                        f"--resume: {change} since the partial run in {partial} began; rerun with "
                        f"the same model, recipe and data, or remove it (rm -r {partial})")
                if state.get("version") != STATE_VERSION:
                    raise ValueError(f"{partial} was written by another llmc version; remove it "
                                     "and start again")
                self.state = state
                self.pieces = {int(k): v for k, v in state["pieces"].items()}
                self.packer.load_state(state["packer"])
                self.resumed_from = state["blocks_done"]
                log.info("resuming %s at block %d of %d", partial, self.resumed_from, n_blocks)
        elif resume:
            log.info("nothing to resume at %s; starting from the first block", partial)
        (partial / "blocks").mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        # Files are written by one thread while the walk goes on: the next job waits for the
        # last, so a state never names a file that is not complete.
        self._writer = ThreadPoolExecutor(1, "llmc-writer")
        self._pending: Future | None = None

    def _submit(self, job: Any) -> None:
        self.wait()
        self._pending = self._writer.submit(job)

    def wait(self) -> None:
        """Until every file submitted so far is written (raising what writing raised)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._writer.shutdown(wait=True)

    @property
    def has_state(self) -> bool:
        """Whether the partial directory holds a state a resumed run can start from."""
        return (self.partial / STATE_FILE).is_file()

    @property
    def cache_dir(self) -> Path:
        return self.partial / "cache"

    # -- the engine's checkpoint protocol -------------------------------------------------------
    def resume_point(self) -> int | None:
        """Blocks already done (None: a fresh run)."""
        return None if self.state is None else self.state["blocks_done"]

    def restore_report(self, report: WalkReport) -> None:
        saved = self.state["report"]
        report.layers = [LayerRecord(**{**r, "shape": tuple(r["shape"])})
                         for r in saved["layers"]]
        report.blocks = saved["blocks"]
        report.transforms = saved["transforms"]
        report.plans = saved["plans"]
        report.experts = saved.get("experts", [])
        report.capture_seconds = saved["capture_seconds"]
        report.engine["resumed_from_block"] = self.state["blocks_done"]

    def restore_caches(self, cache: ActivationCache, teacher: ActivationCache | None) -> None:
        files = self.state["caches"]
        cache.restore(Path(files["hidden"]))
        if teacher is not None:
            if not files.get("teacher"):
                raise ValueError(f"{self.partial}: the saved state lacks the teacher's hidden "
                                 "states; remove it and start again")
            teacher.restore(Path(files["teacher"]))

    def block_done(self, b: int, block: nn.Module, report: WalkReport) -> None:
        """Pack block ``b`` (on the CPU) into the layout and write it as its own file."""
        prefix = f"{self.blocks_prefix}{b}"
        modules = {f"{prefix}.{n}" if n else prefix: m for n, m in block.named_modules()}
        state = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
        tensors = self.packer.pack(modules, state)
        name = f"blocks/block-{b:05d}.safetensors"

        def write() -> None:
            tmp = self.partial / (name + ".tmp")
            # on the disk before the state that names it: a resume after a crash of the
            # machine, not only of the process, finds what the state promises
            write_file(tmp, tensors, metadata={"format": "pt"}, durable=True)
            os.replace(tmp, self.partial / name)

        self._submit(write)
        self.pieces[b] = name

    def boundary(self, blocks_done: int, report: WalkReport,
                 cache: ActivationCache | None = None,
                 teacher: ActivationCache | None = None,
                 files: dict[str, str] | None = None, world: int = 1) -> None:
        """Everything a resumed run needs to start at block ``blocks_done``: written by the
        writer thread after the last block's file, while the next block is worked on (the
        cache's inputs stay untouched until the block after).

        Over several processes (``world``) every rank has already written its windows into
        the snapshot ``files`` (``hidden``: path); the state is written before this returns,
        so that no rank overwrites a snapshot the state on disk still names."""
        state = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "n_blocks": self.n_blocks,
            "blocks_done": blocks_done,
            "pieces": {str(k): v for k, v in self.pieces.items() if k < blocks_done},
            "packer": self.packer.state(),
            "report": {"layers": [dataclasses.asdict(r) for r in report.layers],
                       "blocks": list(report.blocks), "transforms": list(report.transforms),
                       "plans": list(report.plans), "experts": list(report.experts),
                       "capture_seconds": report.capture_seconds},
            "world": world,  # (informative: any number of ranks resumes it)
        }

        def save() -> None:
            caches = dict(files or {})
            if files is None and cache is not None:
                caches["hidden"] = str(cache.persist(self.partial, blocks_done))
            if files is None and teacher is not None:
                caches["teacher"] = str(teacher.persist(self.partial, blocks_done))
            _write_json_atomic(self.partial / STATE_FILE, {
                **state, "caches": caches, "updated": time.strftime("%Y-%m-%d %H:%M:%S")})

        self._submit(save)
        if files is not None:
            self.wait()

    # -- completing the output --------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Write the rest of the model, rewrite what the layout's last decision changed, join
        the pieces into the final files and return ``config.json``'s contents (written here)."""
        self.wait()
        missing = [b for b in range(self.n_blocks) if b not in self.pieces]
        if missing:
            raise RuntimeError(f"blocks {missing[:5]} were never written")
        rest_name = "blocks/rest.safetensors"
        write_file(self.partial / rest_name, self._rest_tensors(), metadata={"format": "pt"})
        names = [self.pieces[b] for b in range(self.n_blocks)] + [rest_name]
        pending = self.packer.v1_linears()
        if pending:
            self._rewrite(names, pending)
        config = self.packer.finish()
        self._join(names)
        with open(self.partial / "config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        for leftover in (STATE_FILE, "blocks", "cache"):
            p = self.partial / leftover
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        for snap in self.partial.glob("*-snapshot-*.bin"):
            snap.unlink()
        return config

    def _rest_tensors(self) -> dict[str, Tensor]:
        """Everything outside the blocks, read from the checkpoint as stored, in the layout."""
        model = self.lazy.model
        inside = self.blocks_prefix
        state: dict[str, Tensor] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            if name.startswith(inside):
                continue
            if t.is_meta:
                state[name] = self.lazy.source.read(self.lazy.checkpoint_name(name))
            else:
                state[name] = t.detach()
        modules = {n: m for n, m in model.named_modules() if not n.startswith(inside)}
        return self.packer.pack(modules, state)

    def _rewrite(self, names: list[str], linears: list[str]) -> None:
        """Rewrite the pieces holding ``linears`` with the layout's final qzeros."""
        wanted = set(linears)
        for name in names:
            f = SafetensorsFile(self.partial / name)
            mine = [n for n in wanted if f"{n}.qzeros" in f.entries]
            if not mine:
                continue
            tensors = self.packer.rewrite({k: f.read(k) for k in f.keys()}, mine)
            tmp = self.partial / (name + ".tmp")
            write_file(tmp, tensors, metadata={"format": "pt"})
            os.replace(tmp, self.partial / name)

    def _join(self, names: list[str]) -> None:
        files = [SafetensorsFile(self.partial / n) for n in names]
        total = sum(f.nbytes(k) for f in files for k in f.keys())
        if total <= self.max_shard_bytes:
            concatenate(self.partial / SINGLE_FILE, files, metadata={"format": "pt"})
            return
        n = len(files)
        weight_map = {}
        for i, f in enumerate(files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(f.path, self.partial / final)
            weight_map.update({k: final for k in f.keys()})
        with open(self.partial / INDEX_FILE, "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
            fh.write("\n")
