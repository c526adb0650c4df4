"""The plan: memory, disk and time of a run, from the model's config alone (a meta-device
skeleton), before any weight loads.

Peak resident memory is the process as it is now plus the largest phase:

- capture: the embeddings in float32 and the activation cache;
- block: one block's float32 masters and its forward copy, the tensor being read, the cache's
  two buffers (and the teacher's, for block-wise distillation), the statistics of the group in
  flight and the solver's work space for the widest Linear, and in ``lockstep`` mode the paused
  chunks' intermediates (every window's attention tensors, or the tail's inputs);
- write: packing the widest Linear into its layout.

On a CUDA device the block, its statistics and the chunks' intermediates count against the
device instead, and the cache (pinned) against RAM. The plan picks the cache's place (RAM, or
files under the offload directory) and the lockstep mode (one pass with paused chunks, or a
replay pass per group) so that the peak fits the budget, and refuses with the figures when
nothing does. Times come from a short matmul probe on the compute device and an assumed disk
rate: an estimate, not a measurement.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmc.engine.memory import gib
from llmc.engine.walker import calibrating, reads_as_stored
from llmc.interfaces import LINEAR, MODEL, TRANSFORM

DISK_RATE = 1.0e9  # bytes/s assumed for reading the checkpoint and writing the output
PROCESS_SLACK = 1.10  # allocator fragmentation and small tensors, measured on the benchmarks


@dataclass
class Shape:
    """What the plan needs to know of a model, read off its meta-device skeleton."""

    n_blocks: int
    block_params: int
    hidden: int
    kv_width: int
    ffn: int
    widest: tuple[int, int]  # (out, in) of the largest targeted Linear
    largest_in: int  # widest input of a targeted Linear (its Hessian is in x in)
    targeted_params: int  # per block
    embed_params: int  # what runs before block 0 (the capture reads it)
    rest_params: int  # outside the blocks (embeddings, norm, head, tied once)
    total_params: int
    vocab: int
    has_tail: bool

    @classmethod
    def of(cls, model: nn.Module, adapter: Any, selects: Any) -> Shape:
        blocks = adapter.get_blocks(model)
        block = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
        b = list(blocks).index(block)
        prefix = f"{adapter.blocks}.{b}."
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        targeted = {n: m for n, m in linears.items() if selects(prefix + n)} or linears
        widest = max(targeted.values(), key=lambda m: m.weight.numel())
        config = model.config.get_text_config()
        hidden = config.hidden_size
        heads = getattr(config, "num_attention_heads", 1)
        kv = getattr(config, "num_key_value_heads", heads) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        ffn = max((m.out_features for m in linears.values()), default=hidden)
        unique = {id(p): p for p in model.parameters()}
        in_blocks = {id(p) for p in blocks.parameters()}
        head = model.get_output_embeddings()
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        embed_ids = {id(p) for p in model.get_input_embeddings().parameters()}
        embed = sum(p.numel() for i, p in unique.items()
                    if i not in in_blocks and (i not in head_ids or i in embed_ids))
        return cls(
            n_blocks=len(blocks), block_params=sum(p.numel() for p in block.parameters()),
            hidden=hidden, kv_width=kv * head_dim, ffn=ffn,
            widest=(widest.out_features, widest.in_features),
            largest_in=max(m.in_features for m in targeted.values()),
            targeted_params=sum(m.weight.numel() for m in targeted.values()),
            embed_params=embed,
            rest_params=sum(p.numel() for i, p in unique.items() if i not in in_blocks),
            total_params=sum(p.numel() for p in unique.values()),
            vocab=getattr(config, "vocab_size", 0), has_tail=adapter.tail is not None,
        )


@dataclass
class Work:
    """What the recipe asks of the walk."""

    calibrating: bool
    sequential: bool
    hessian: bool  # GPTQ / SparseGPT statistics
    awq: bool
    awq_gptq: bool
    block_distill: bool
    logit_distill: bool
    bits: int | None  # the quantized width (None: dense output)
    owl: bool
    as_stored: bool = False  # a streamed walk reads blocks as stored, codes only (RTN alone)
    # learned rounding (signround): training steps per block, in steps on every token (a step
    # on a token sample runs the MLP, about two thirds of a block's weights, on the sample)
    rounding_steps: float = 0.0

    @classmethod
    def of(cls, steps: list[tuple[int, Any, Any]], kv_cache: Any = None) -> Work:
        """What ``steps`` do (and a quantized KV cache, whose scales need the windows)."""
        comps = [c for _, _, c in steps]
        cal = [c for c in comps if c.needs_calibration]
        linear = [c for c in comps if c.kind == LINEAR]
        schemes = [s.config.scheme for _, s, _ in steps
                   if getattr(s.config, "scheme", None) is not None]
        methods = [s.method for _, s, _ in steps]
        return cls(
            calibrating=calibrating(steps, kv_cache),
            # (a Linear step with statistics must exist: AWQ then RTN, or SignRound alone,
            # pause no chunks)
            sequential=bool(cal) and any(c.needs_calibration and c.stats_kind for c in linear)
            and all(c.sequential for c in linear if c.needs_calibration and c.stats_kind),
            hessian=any(c.stats_kind == "hessian" for c in linear),
            awq="awq" in methods,
            awq_gptq=any(getattr(s.config, "search", None) == "gptq" for _, s, _ in steps),
            block_distill=any(c.kind == TRANSFORM and c.needs_teacher for c in comps),
            logit_distill=any(c.kind == MODEL for c in comps),
            bits=schemes[-1].bits if schemes else None,
            owl=any(getattr(s.config, "owl", False) for _, s, _ in steps),
            as_stored=reads_as_stored(steps, kv_cache),
            rounding_steps=sum(s.config.steps * (1 - 2 / 3 * (1 - s.config.token_fraction))
                               for _, s, _ in steps if s.method == "signround"),
        )


@dataclass
class Phase:
    name: str
    ram: int
    device: int = 0
    parts: dict[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    """A run's plan; see the module docstring. Byte figures, seconds estimated."""

    mode: str  # "stream" (block by block from disk) or "resident" (the whole model in memory)
    device: str
    cache: str
    lockstep: str
    prefetch: bool
    phases: list[Phase]
    baseline: int
    peak_ram: int
    peak_device: int
    budget_ram: int
    budget_source: str
    device_free: int | None
    disk_need: int
    disk_free: int | None
    disk_where: str
    output_bytes: int
    offload_bytes: int
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["phases"] = [asdict(p) for p in self.phases]
        return d

    def fits(self) -> bool:
        return self.problems() == []

    def problems(self) -> list[str]:
        out = []
        if self.peak_ram > self.budget_ram:
            top = max(self.phases, key=lambda p: p.ram)
            parts = ", ".join(f"{k} {gib(v)}" for k, v in sorted(
                top.parts.items(), key=lambda kv: -kv[1])[:4])
            out.append(f"the plan needs {gib(self.peak_ram)} of RAM at its peak ({top.name}: "
                       f"{parts}; this process already holds {gib(self.baseline)}) but "
                       f"{self.budget_source} allows {gib(self.budget_ram)}")
        if self.device_free is not None and self.peak_device > self.device_free:
            out.append(f"the plan needs {gib(self.peak_device)} on {self.device} but "
                       f"{gib(self.device_free)} is free there")
        if self.disk_free is not None and self.disk_need > self.disk_free:
            out.append(f"the output and its work files need about {gib(self.disk_need)} in "
                       f"{self.disk_where} but only {gib(self.disk_free)} is free there")
        return out

    def check(self) -> None:
        """Refuse, with the figures and what to change, a plan that does not fit."""
        problems = self.problems()
        if not problems:
            return
        advice = ("lower --samples, --seqlen or --batch-size, put the activation cache on disk "
                  "(--offload-dir on a disk with room), use --device cuda, or raise "
                  "--max-memory" if self.peak_ram > self.budget_ram or (
                      self.device_free is not None and self.peak_device > self.device_free)
                  else "free some disk space or write the output elsewhere")
        raise ValueError("; ".join(problems) + f": {advice} (see the plan with --dry-run)")

    def render(self) -> str:
        lines = [f"plan: {self.mode} on {self.device}; activation cache in {self.cache}; "
                 f"sequential groups: {self.lockstep}; next block read ahead: "
                 f"{'yes' if self.prefetch else 'no'}"]
        for p in self.phases:
            dev = f", {gib(p.device)} on {self.device}" if p.device else ""
            parts = ", ".join(f"{k} {gib(v)}" for k, v in p.parts.items() if v)
            lines.append(f"  {p.name:<8} RAM {gib(p.ram)}{dev}  ({parts})")
        lines.append(f"  peak RAM {gib(self.peak_ram)} of {gib(self.budget_ram)} "
                     f"({self.budget_source}); this process holds {gib(self.baseline)} now")
        if self.device_free is not None:
            lines.append(f"  peak on {self.device} {gib(self.peak_device)} of "
                         f"{gib(self.device_free)} free")
        free = gib(self.disk_free) if self.disk_free is not None else "?"
        lines.append(f"  disk: output about {gib(self.output_bytes)}, work files "
                     f"{gib(self.offload_bytes)}; needs {gib(self.disk_need)} of {free} free in "
                     f"{self.disk_where}")
        s = self.seconds
        lines.append(f"  time (estimate): about {s['total']:.0f} s (read {s['read']:.0f}, "
                     f"compute {s['compute']:.0f}, write {s['write']:.0f})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 0.05) -> float:
    """FLOP/s of a square ``F.linear`` in ``dtype`` on ``device`` (1024 on a CPU, 4096 on a GPU:
    the sizes of a block's Linears over a chunk of tokens), measured for ``seconds`` after as
    long a warm-up. (A 512-square ``a @ b`` on a 2-core CPU runs at a quarter of this in
    float32, and in bfloat16 without native support at a tenth of ``F.linear``'s rate.)"""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        F.linear(a, b).sum().item()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        c = F.linear(a, b)
        count += 1
    c.sum().item()
    return 2 * n**3 * count / (time.perf_counter() - t0)


def _output_bytes(shape: Shape, work: Work, save_bytes: int) -> int:
    """Bytes of the written checkpoint."""
    lin = shape.targeted_params * shape.n_blocks
    other_block = (shape.block_params - shape.targeted_params) * shape.n_blocks
    if work.bits:
        per_weight = work.bits / 8 + 2 * 2 / 128  # codes, plus fp16 scales and zeros per group
        quantized = int(lin * per_weight)
    else:
        quantized = lin * save_bytes
    return quantized + (other_block + shape.rest_params) * save_bytes


def make_plan(
    shape: Shape, work: Work, *, samples: int, seqlen: int, batch_size: int,
    walker_dtype: torch.dtype, device: torch.device, mode: str, cache: str = "auto",
    lockstep: str = "auto", baseline: int, budget: tuple[int, str], stored_bytes: int,
    save_bytes: int, out_parent: Path | None, offload_dir: Path | None, probe: bool = True,
    max_shard_bytes: int = 2_000_000_000, read_bytes: int = 4,
) -> Plan:
    """The plan of a run; ``cache``/``lockstep`` ``auto`` are chosen to fit ``budget``
    (bytes, and where the figure comes from). ``read_bytes``: bytes per weight of a block
    tensor as the checkpoint is read (a streamed walk that keeps blocks as stored holds
    them so)."""
    caches = ["ram", "disk"] if cache == "auto" else [cache]
    if not work.sequential:
        modes = ["n/a"]
    elif lockstep == "auto":
        modes = ["lockstep", "replay"]
    else:
        modes = [lockstep]
    order = [(c, m) for m in modes for c in caches]
    if device.type == "cuda":  # device memory decides the mode, RAM the cache
        order = [(c, m) for c in caches for m in modes]
    # reading the next block ahead costs one block as stored; dropped first when short
    order = [(c, m, ahead) for c, m in order
             for ahead in ((True, False) if mode == "stream" else (False,))]
    device_free = None
    if device.type == "cuda":
        device_free = torch.cuda.mem_get_info(device)[0]
    rate = matmul_rate(device, walker_dtype) if probe else 1e11
    notes = []
    if probe and device.type == "cpu" and walker_dtype != torch.float32:
        fp32 = matmul_rate(device, torch.float32)
        if fp32 > 2 * rate:
            notes.append(f"{str(walker_dtype).removeprefix('torch.')} matmuls run at "
                         f"{rate / 1e9:.0f} GFLOP/s on this CPU against {fp32 / 1e9:.0f} in "
                         "float32: --dtype float32 would be faster here")
    plans = []
    for c, m, ahead in order:
        p = _plan_for(shape, work, samples=samples, seqlen=seqlen, batch_size=batch_size,
                      wd=walker_dtype.itemsize, device=device, mode=mode, cache=c, lockstep=m,
                      prefetch=ahead,
                      baseline=baseline, budget=budget, device_free=device_free,
                      stored_bytes=stored_bytes, save_bytes=save_bytes, rate=rate,
                      out_parent=out_parent, offload_dir=offload_dir,
                      max_shard_bytes=max_shard_bytes, read_bytes=read_bytes)
        p.notes = list(notes)
        plans.append(p)
        if p.fits():
            return p
    return plans[0]


def _plan_for(shape: Shape, work: Work, *, samples: int, seqlen: int, batch_size: int, wd: int,
              device: torch.device, mode: str, cache: str, lockstep: str, prefetch: bool,
              baseline: int,
              budget: tuple[int, str], device_free: int | None, stored_bytes: int,
              save_bytes: int, rate: float, out_parent: Path | None, offload_dir: Path | None,
              max_shard_bytes: int, read_bytes: int = 4) -> Plan:
    cuda = device.type == "cuda"
    tok = samples * seqlen if work.calibrating else 0
    d, dff, dkv = shape.hidden, shape.ffn, shape.kv_width
    N, K = shape.widest
    cache_one = tok * d * wd
    n_caches = (2 if work.block_distill else 1) * (2 if cache == "ram" else 0)
    cache_ram = cache_one * n_caches
    chunk_tok = min(batch_size, max(samples, 1)) * seqlen if work.calibrating else 0
    chunk_act = chunk_tok * (3 * d + 2 * dkv + 2 * dff) * wd  # one chunk through the block
    streamed = mode == "stream"
    as_stored = work.as_stored and streamed
    masters = shape.block_params * (read_bytes if as_stored else 4)  # the block's masters
    fwd_copy = shape.block_params * wd if wd != 4 and work.calibrating else 0
    # the widest tensor as stored, and cast to float32 (as stored: mapped, the masters)
    read_buf = 0 if as_stored else N * K * 4
    stats = shape.largest_in**2 * 4 if work.hessian else shape.largest_in * 4
    if work.hessian:
        solver = (4 * K * K + 4 * N * K) * 4
    else:  # the dense result and its codes (as stored: the codes alone, counted below)
        solver = 0 if as_stored else 3 * N * K * 4
    # a streamed walk keeps every quantized Linear's codes (one byte each) until the block
    # is packed
    codes = shape.targeted_params if streamed and work.bits else 0
    if work.awq:
        stats += (3 * d * d + dff * dff) * 4 if not work.hessian else dff * dff * 4
    if work.sequential and lockstep == "lockstep":
        paused = tok * wd * max(4 * d + 2 * dkv, dff if shape.has_tail else d + dff)
    else:
        paused = 0
    teacher = shape.block_params * 4 + 3 * shape.targeted_params * 4 if work.block_distill else 0
    # learned rounding: per weight its float32 copy, offset, gradient and best offset, two int8
    # code snapshots; one chunk's forward kept for the backward, in float32
    rounding = (shape.targeted_params * (4 * 4 + 2) + 2 * chunk_tok * (3 * d + 2 * dkv + 2 * dff)
                * 4) if work.rounding_steps else 0
    # a streamed block's packed tensors, held by the writer thread until they are written
    packed = int(shape.targeted_params * (work.bits or 16) / 8) if streamed else 0
    if streamed:  # the kept codes packed: bytes, then words, and the block's packed tensors
        pack = N * K * 2 + packed
    else:
        pack = N * K * (4 + 4 + 8 + 8)  # codes and their check, int64 words, of the widest

    on_dev = {"block masters": masters, "forward copy": fwd_copy, "statistics": stats,
              "solver": solver, "codes": codes, "paused chunks": paused,
              "chunk activations": chunk_act, "teacher block": teacher,
              "learned rounding": rounding}
    stored = stored_bytes / max(shape.total_params, 1)  # bytes per weight on disk
    ahead = int(shape.block_params * stored) if prefetch else 0
    block_parts = {"activation cache": cache_ram, "tensor being read": read_buf,
                   "next block, read ahead": ahead, "last block, being written": packed}
    if cuda:
        block_parts["block on the CPU for writing"] = masters
    else:
        block_parts.update(on_dev)
    capture_parts = {"embeddings": shape.embed_params * 4, "activation cache": cache_ram,
                     "chunk": chunk_tok * d * 4 * 3}
    write_parts = {"block masters": masters, "activation cache": cache_ram, "codes": codes,
                   "packing": pack if work.bits else 0, "next block, read ahead": ahead}
    phases = []
    if work.calibrating:
        phases.append(Phase("capture", sum(capture_parts.values()),
                            shape.embed_params * 4 if cuda else 0, capture_parts))
    phases.append(Phase("block", sum(block_parts.values()),
                        sum(on_dev.values()) if cuda else 0, block_parts))
    phases.append(Phase("write", sum(write_parts.values()), 0, write_parts))
    if mode == "resident":
        model = shape.total_params * 4
        whole = {"model": model}
        if work.logit_distill:
            whole.update({"teacher": model, "training": 3 * shape.targeted_params * 4 *
                          shape.n_blocks, "logits": 4 * batch_size * seqlen * shape.vocab * 4})
        phases.append(Phase("resident", sum(whole.values()), 0, whole))
        for p in phases[:-1]:
            p.ram += model
            p.parts["resident model"] = model
    for p in phases:
        p.ram = int(p.ram * PROCESS_SLACK)
    peak_ram = baseline + max(p.ram for p in phases)
    peak_dev = max((p.device for p in phases), default=0)

    output = _output_bytes(shape, work, save_bytes)
    snapshots = 2 * cache_one * (2 if work.block_distill else 1) if mode == "stream" else 0
    offload = (2 * cache_one * (2 if work.block_distill else 1)) if cache == "disk" else 0
    joined = 2 if output <= max_shard_bytes else 1
    disk_need = output * joined + (snapshots if cache == "ram" else 0)
    where = out_parent
    disk_free = None
    if where is not None:
        while not where.exists() and where != where.parent:
            where = where.parent
        disk_free = shutil.disk_usage(where).free
        if offload and offload_dir is not None and not _same_disk(offload_dir, where):
            od = offload_dir
            while not od.exists() and od != od.parent:
                od = od.parent
            if shutil.disk_usage(od).free < offload:
                disk_free = min(disk_free, shutil.disk_usage(od).free)
        else:
            disk_need += offload

    passes = 1.0
    if work.calibrating:
        passes = 2.0 if not work.sequential else (1.0 if lockstep == "lockstep" else 3.0)
        if work.awq:
            passes += 2.0
    flops_fwd = 2 * shape.block_params * tok * passes if work.calibrating else 0
    solve = 0.0
    if work.hessian:
        # Hessians (tokens x K^2 per group), the solve (~K^3 + 2 N K^2), the clip search
        solve = 4 * tok * K * K + shape.targeted_params * K * 4 + 40 * shape.targeted_params * 100
    elif work.bits:
        solve = 20 * shape.targeted_params
    # each training step: one chunk forward and backward (three forwards' work), plus the
    # teacher's pass and the held-out checks (about one more pass)
    train = 6 * shape.block_params * chunk_tok * work.rounding_steps \
        + 2 * shape.block_params * tok * bool(work.rounding_steps)
    compute = shape.n_blocks * (flops_fwd + solve + train) / max(rate, 1.0)
    if work.awq:
        compute *= 2.0 if not work.awq_gptq else 4.0
    seconds = {"read": stored_bytes / DISK_RATE, "write": output / DISK_RATE,
               "compute": compute}
    seconds["total"] = sum(seconds.values())
    return Plan(
        mode=mode, device=str(device), cache=cache, lockstep=lockstep, prefetch=prefetch,
        phases=phases,
        baseline=baseline, peak_ram=peak_ram, peak_device=peak_dev, budget_ram=budget[0],
        budget_source=budget[1] or "the machine", device_free=device_free,
        disk_need=int(disk_need), disk_free=disk_free, disk_where=str(where),
        output_bytes=int(output), offload_bytes=int(offload + snapshots), seconds=seconds,
    )


def _same_disk(a: Path, b: Path) -> bool:
    try:
        ea = a
        while not ea.exists() and ea != ea.parent:
            ea = ea.parent
        return ea.stat().st_dev == b.stat().st_dev
    except OSError:
        return True
