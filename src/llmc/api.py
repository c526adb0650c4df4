"""The public functions: ``compress``, ``plan``, ``distill``, ``evaluate``, ``save``, ``load``.

``compress(model, recipe)`` compresses a resident model in place. ``compress("path-or-id",
recipe, out=...)`` streams the checkpoint instead: the model is read block by block from disk
(safetensors or GGUF), compressed on the chosen device and written block by block to ``out``,
so a model larger than the machine's memory compresses, and a killed run resumes
(``resume=True``). ``plan`` gives the memory, disk and time such a run needs, from the config
alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import llmc.formats  # noqa: F401  (registers every checkpoint format)
import llmc.methods  # noqa: F401  (registers every method)
from llmc.calibration import CalibrationConfig, calibration_windows, heldout_windows, load_rows
from llmc.checks import check_model, check_seqlen
from llmc.engine import Engine, EngineOptions, WalkReport
from llmc.engine.blocks import LazyBlocks, ResidentBlocks
from llmc.engine.config import resolve_device
from llmc.engine.distributed import Distributed, local_device
from llmc.engine.memory import memory_budget, parse_bytes, rss_bytes
from llmc.engine.plan import Plan, Shape, Work, make_plan
from llmc.engine.stream import StreamingCheckpoint, partial_dir
from llmc.engine.walker import check_distributed, reads_as_stored
from llmc.eval.perplexity import evaluate_text
from llmc.eval.tasks import PreparedTasks, evaluate_tasks, task_scores
from llmc.interfaces import MODEL
from llmc.models import get_adapter, load_config, load_model, load_tokenizer, resolve
from llmc.models.moe import unfuse_experts
from llmc.recipe import Recipe
from llmc.registry import FORMATS
from llmc.report import HTML_FILE, JSON_FILE, write_html

log = logging.getLogger(__name__)

REPORT_FILE = JSON_FILE
RECIPE_FILE = "recipe.yaml"


@dataclass
class CompressionReport:
    """What ``compress`` did: per-layer relative output error (and sparsity, when pruned), time
    per block, what each block transform chose (AWQ: per pair the exponent and the losses),
    MoE experts (per block and expert: calibration tokens routed to it, rows its statistics saw,
    the data-free fallback when they were too few),
    what a planning pass chose (OWL: per block the outlier ratio and sparsity), what each
    distill step did (held-out KL before and at the best step, its history), how the engine ran
    (device, cache placement, lockstep mode, resumed block) and its plan, totals."""

    recipe: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    transforms: list[dict[str, Any]] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)
    experts: list[dict[str, Any]] = field(default_factory=list)
    distill: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    capture_seconds: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_walk(cls, recipe: Recipe, walk: WalkReport, **kw: Any) -> CompressionReport:
        return cls(recipe=recipe.to_dict(), layers=[asdict(r) for r in walk.layers],
                   blocks=walk.blocks, transforms=walk.transforms, plans=walk.plans,
                   experts=walk.experts, capture_seconds=walk.capture_seconds,
                   engine=walk.engine, **kw)


DISTRIBUTION = "llmc-compress"  # the name pip knows llmc by


def _llmc_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def _windows(
    tokenizer: Any, calibration: Tensor | CalibrationConfig | None, recipe: Recipe,
    heldout: int = 0,
) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Calibration windows, and ``heldout`` windows never trained on (distill steps): from the
    calibration text, disjoint from the calibration windows; from a tensor, its last rows."""
    if isinstance(calibration, Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise ValueError("calibration: expected integer token ids of shape [samples, seqlen]")
        ids = calibration.long()
        info = {"source": "tensor", "shape": list(calibration.shape)}
        if not heldout:
            return ids, None, info
        if ids.shape[0] <= heldout:
            raise ValueError(f"calibration: {ids.shape[0]} windows leave none to train on after "
                             f"the distill step's {heldout} held-out windows")
        return ids[:-heldout], ids[-heldout:], {**info, "heldout": "last rows"}
    config = calibration if isinstance(calibration, CalibrationConfig) else recipe.calibration
    if tokenizer is None:
        raise ValueError(
            "compress(): pass tokenizer=... (or calibration=<token ids tensor>) for a recipe "
            "that needs calibration data"
        )
    held = heldout_windows(tokenizer, config, heldout) if heldout else None
    return calibration_windows(tokenizer, config), held, asdict(config)


def _steps(recipe: Recipe) -> tuple[list, list]:
    """(walk steps, whole-model steps) as ``(index, Step, compressor)``."""
    steps = [(i, s, s.compressor()) for i, s in enumerate(recipe.steps)]
    post = [st for st in steps if st[2].kind == MODEL]
    return [st for st in steps if st not in post], post


def _calibration_shape(recipe: Recipe, calibration: Any) -> tuple[int, int]:
    if isinstance(calibration, Tensor):
        return int(calibration.shape[0]), int(calibration.shape[1])
    cal = calibration if isinstance(calibration, CalibrationConfig) else recipe.calibration
    return cal.samples, cal.seqlen


def _make_plan(model: nn.Module, adapter: Any, recipe: Recipe, steps: list, *,
               calibration: Any, device: torch.device, mode: str, cache: str, lockstep: str,
               max_memory: str | int | None, stored_bytes: int, save_bytes: int,
               out: Path | None, offload_dir: Path | None, probe: bool,
               max_shard_bytes: int = 2_000_000_000, read_bytes: int = 4,
               dist: Distributed | None = None) -> Plan:
    samples, seqlen = _calibration_shape(recipe, calibration)
    shape = Shape.of(model, adapter, lambda n: any(s.selects(n) for _, s, _ in steps))
    if max_memory is not None:
        budget = (parse_bytes(max_memory), "--max-memory")
    else:
        budget = memory_budget()
    if dist is not None:  # one rank's windows, in its share of the machine's memory
        bs = recipe.walker.batch_size
        chunks = -(-samples // bs)  # the most chunks a rank holds, in windows
        samples = -(-chunks // dist.world) * bs
        here = dist.ranks_on_machine
        budget = (budget[0] // here, f"{budget[1]} / {here} ranks on this machine")
    return make_plan(
        shape, Work.of(steps, recipe.kv_cache), samples=samples, seqlen=seqlen,
        batch_size=recipe.walker.batch_size, walker_dtype=recipe.walker.torch_dtype,
        device=device, mode=mode, cache=cache, lockstep=lockstep, baseline=rss_bytes(),
        budget=budget, stored_bytes=stored_bytes, save_bytes=save_bytes,
        out_parent=out.parent if out is not None else None, offload_dir=offload_dir,
        probe=probe, max_shard_bytes=max_shard_bytes, read_bytes=read_bytes,
    )


def compress(
    model: nn.Module | str | Path,
    recipe: Recipe | dict | str | Path,
    *,
    tokenizer: Any = None,
    calibration: Tensor | CalibrationConfig | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    format: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    max_memory: str | int | None = None,
    offload_dir: str | Path | None = None,
    cache: str = "auto",
    lockstep: str = "auto",
    trust_remote_code: bool = False,
    max_shard_bytes: int = 2_000_000_000,
    exact_stats: bool = False,
) -> tuple[Any, CompressionReport]:
    """Compress a model with ``recipe``.

    ``model`` an ``nn.Module``: compressed in place on ``device`` (default: where it is; each
    block visits the device for its turn), returned with a report.

    ``model`` a name (HF directory or id, ``.gguf`` file, demo name): streamed from disk block
    by block into the checkpoint ``out`` (``format``: gptq, awq or compressed-tensors; default
    awq after a 4-bit awq step, else gptq), never held whole in memory; returns
    ``(Path(out), report)``. The plan's peak memory must fit ``max_memory`` (default: what the
    machine, or its cgroup, has free); ``resume`` continues a killed run into the same ``out``.

    ``calibration`` is a token-id tensor [samples, seqlen], a ``CalibrationConfig``, or None
    for the recipe's own ``calibration`` section (read with ``tokenizer``; a streamed model's
    own tokenizer by default). ``cache`` (``auto``, ``ram``, ``disk``) and ``lockstep``
    (``auto``, ``lockstep``, ``replay``) override the plan's choices. A streamed output of at
    most ``max_shard_bytes`` is one ``model.safetensors``; a larger one keeps a shard per block.

    Inside a process group (an initialised ``torch.distributed`` group, or a ``torchrun``
    launch) the calibration windows are split over the ranks and every rank must call
    ``compress`` alike; a streamed output is written by rank 0 (see
    :mod:`llmc.engine.distributed`). ``exact_stats`` sums the statistics in float64, so that
    any number of ranks gives the checkpoint of one process.
    """
    if isinstance(model, (str, Path)):
        if out is None:
            raise ValueError("compress(<model name>, ...) streams to a checkpoint: pass out=...")
        return _compress_stream(
            str(model), Recipe.coerce(recipe), Path(out), tokenizer=tokenizer,
            calibration=calibration, progress=progress, device=device, fmt=format,
            overwrite=overwrite, resume=resume, max_memory=max_memory,
            offload_dir=None if offload_dir is None else Path(offload_dir), cache=cache,
            lockstep=lockstep, trust_remote_code=trust_remote_code,
            max_shard_bytes=max_shard_bytes, exact_stats=exact_stats)
    if out is not None or resume:
        raise ValueError("out= and resume= stream a checkpoint from disk: pass the model's name "
                         "or path, or call llmc.save() after compressing a resident model")
    return _compress_resident(model, Recipe.coerce(recipe), tokenizer=tokenizer,
                              calibration=calibration, progress=progress, device=device,
                              cache=cache, lockstep=lockstep, max_memory=max_memory,
                              offload_dir=offload_dir, exact_stats=exact_stats)


def _connect(dev: torch.device, steps: list, post_steps: list,
             progress: bool) -> tuple[Distributed | None, torch.device, bool]:
    """This process's rank when it belongs to a group (after refusing what a distributed run
    cannot do), its device and whether it shows progress (rank 0 only)."""
    dist = Distributed.connect(dev)
    if dist is None:
        return None, dev, progress
    if post_steps:
        raise ValueError("distill (logit mode) trains the whole model after the walk, which "
                         "does not run over several processes; run it in one process")
    check_distributed(steps)
    return dist, local_device(dev), progress and dist.rank == 0


def _compress_resident(model: nn.Module, recipe: Recipe, *, tokenizer: Any, calibration: Any,
                       progress: bool, device: Any, cache: str, lockstep: str,
                       max_memory: Any, offload_dir: Any,
                       exact_stats: bool = False) -> tuple[nn.Module, CompressionReport]:
    unfuse_experts(model)  # MoE: per-expert Linears in place (the model computes the same)
    adapter = get_adapter(model.config)
    check_model(recipe, model.config)
    dtypes = {p.dtype for b in adapter.get_blocks(model) for p in b.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(
            f"compress() needs the blocks in float32 (found {sorted(map(str, dtypes))}): the "
            "quantized weights are kept dense and exact on their grid until export; load the "
            "model with dtype=torch.float32 (block forwards still run in the walker's dtype)"
        )
    model.eval()
    home = next(model.parameters()).device
    dev = home if device is None else resolve_device(device)
    walk_steps, post_steps = _steps(recipe)
    dist, dev, progress = _connect(dev, walk_steps, post_steps, progress)
    windows, held, calib_info = None, None, {}
    if recipe.needs_calibration:
        n_held = max((s.config.heldout for _, s, _ in post_steps), default=0)  # logit mode
        windows, held, calib_info = _windows(tokenizer, calibration, recipe, n_held)
        check_seqlen(recipe, model.config, windows.shape[1])
        if dist is not None:
            windows = dist.windows(windows, recipe.walker.batch_size)
    t = time.perf_counter()
    # The teacher of the distill steps: the model before any compression step (a copy).
    teacher = None
    if post_steps:
        from llmc.methods.distill import snapshot_teacher

        teacher = snapshot_teacher(model)
    walk, plan = WalkReport(), None
    if walk_steps:
        plan = _make_plan(model, adapter, recipe, walk_steps, calibration=windows, device=dev,
                          mode="in-memory", cache=cache, lockstep=lockstep,
                          max_memory=max_memory, stored_bytes=0, save_bytes=4, out=None,
                          offload_dir=None, probe=False)
        with tempfile.TemporaryDirectory(prefix="llmc-cache-") as tmp:
            options = EngineOptions(dev, plan.cache, Path(offload_dir or tmp),
                                    plan.lockstep if plan.lockstep != "n/a" else "lockstep",
                                    exact_stats=exact_stats)
            engine = Engine(ResidentBlocks(model, adapter, dev), adapter, walk_steps,
                            recipe.walker, options, progress=progress,
                            kv_cache=recipe.kv_cache, dist=dist)
            walk = engine.run(windows)
    distilled = []
    for idx, step, comp in post_steps:
        record = comp.run(model, teacher, windows, held, step, progress=progress)
        distilled.append({"step": idx, "method": step.method, **record})
    del teacher
    report = CompressionReport.from_walk(recipe, walk, distill=distilled,
                                         seconds=time.perf_counter() - t, calibration=calib_info,
                                         plan=plan.to_dict() if plan else None)
    model.llmc_recipe = recipe
    return model, report


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory; remove it or choose another path")


def _prepare_stream(model_name: str, recipe: Recipe, fmt: str | None, trust_remote_code: bool,
                    calibration: Any = None):
    """Every check that needs no weights; returns (source, config, lazy model, adapter,
    format)."""
    from llmc.formats.checkpoint import check_writable, default_format, quant_method
    from llmc.models.lazy import open_lazy

    if Path(model_name).is_dir() and quant_method(Path(model_name)):
        raise ValueError(f"{model_name} is already {quant_method(Path(model_name))}-quantized; "
                         "compress the original model")
    fmt = fmt or default_format(recipe)
    check_writable(recipe, fmt)
    src = resolve(model_name)
    config = load_config(model_name, trust_remote_code)
    adapter = get_adapter(config)
    lazy = open_lazy(src, config, trust_remote_code)
    layout = FORMATS.get(fmt).impl
    check_model(recipe, config, divisible_groups=fmt if layout.divisible_groups else None,
                       skeleton=lazy.model)
    check_seqlen(recipe, config, _calibration_shape(recipe, calibration)[1])
    cal = recipe.calibration
    if recipe.needs_calibration and not isinstance(calibration, Tensor):
        load_rows(cal.dataset, cal.split, text_column=cal.text_column)  # a missing file fails now
    return src, config, lazy, adapter, fmt


def plan(
    model: str | Path,
    recipe: Recipe | dict | str | Path,
    *,
    out: str | Path | None = None,
    device: str | torch.device | None = "auto",
    format: str | None = None,
    max_memory: str | int | None = None,
    offload_dir: str | Path | None = None,
    cache: str = "auto",
    lockstep: str = "auto",
    trust_remote_code: bool = False,
) -> Plan:
    """The plan of ``compress(model, recipe, out=...)``: peak RAM and device memory per phase,
    disk for the output and the offload, an estimated time, and the cache placement and
    lockstep mode it picks; from the model's config alone (nothing is read but file headers)."""
    recipe = Recipe.coerce(recipe)
    dev = resolve_device(device)
    _, _, lazy, adapter, _ = _prepare_stream(str(model), recipe, format, trust_remote_code)
    walk_steps, post_steps = _steps(recipe)
    return _make_plan(lazy.model, adapter, recipe, walk_steps + post_steps,
                      calibration=None, device=dev,
                      mode="resident" if post_steps else "stream", cache=cache,
                      lockstep=lockstep, max_memory=max_memory,
                      stored_bytes=lazy.bytes_on_disk(), read_bytes=lazy.read_bytes(),
                      save_bytes=lazy.save_dtype.itemsize,
                      out=Path(out) if out is not None else Path.cwd() / "out",
                      offload_dir=Path(offload_dir) if offload_dir else None, probe=True)


def _compress_stream(model_name: str, recipe: Recipe, out: Path, *, tokenizer: Any,
                     calibration: Any, progress: bool, device: Any, fmt: str | None,
                     overwrite: bool, resume: bool, max_memory: Any, offload_dir: Path | None,
                     cache: str, lockstep: str, trust_remote_code: bool,
                     max_shard_bytes: int,
                     exact_stats: bool = False) -> tuple[Path, CompressionReport]:
    from llmc.formats.checkpoint import recipe_act_order, recipe_quantizes
    from llmc.formats.packer import Packer

    _check_output(out, overwrite)
    dev = resolve_device(device)
    src, config, lazy, adapter, fmt = _prepare_stream(model_name, recipe, fmt, trust_remote_code,
                                                      calibration)
    walk_steps, post_steps = _steps(recipe)
    dist, dev, progress = _connect(dev, walk_steps, post_steps, progress)
    if post_steps:
        if resume:
            raise ValueError("--resume: a recipe with a logit distill step trains the whole "
                             "model after the walk, which cannot resume; run it without "
                             "--resume")
        return _compress_whole(model_name, recipe, out, calibration=calibration,
                               tokenizer=tokenizer, progress=progress, device=dev, fmt=fmt,
                               overwrite=overwrite, max_memory=max_memory, lazy=lazy,
                               adapter=adapter, trust_remote_code=trust_remote_code)
    the_plan = _make_plan(lazy.model, adapter, recipe, walk_steps, calibration=calibration,
                          device=dev, mode="stream", cache=cache, lockstep=lockstep,
                          max_memory=max_memory, stored_bytes=lazy.bytes_on_disk(),
                          read_bytes=lazy.read_bytes(),
                          save_bytes=lazy.save_dtype.itemsize, out=out, offload_dir=offload_dir,
                          probe=False, max_shard_bytes=max_shard_bytes, dist=dist)
    the_plan.check()
    log.info("%s", the_plan.render())
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(src, trust_remote_code)
        except (OSError, ValueError) as e:
            if recipe.needs_calibration and not isinstance(calibration, Tensor):
                raise ValueError(f"cannot load the tokenizer of '{model_name}': {e}") from None
            tokenizer = None
    windows, calib_info = None, {}
    if recipe.needs_calibration:
        windows, _, calib_info = _windows(tokenizer, calibration, recipe)
        check_seqlen(recipe, config, windows.shape[1])
    fingerprint = {
        "model": lazy.fingerprint(), "recipe": recipe.to_dict(), "format": fmt,
        "llmc": _llmc_version(),
        "calibration": None if windows is None else {
            "shape": list(windows.shape),
            "sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()},
    }
    if dist is not None:
        windows = None if windows is None else dist.windows(windows, recipe.walker.batch_size)
        if dist.rank != 0:
            return _follow_stream(out, lazy, adapter, walk_steps, recipe, windows, dev,
                                  the_plan, offload_dir, exact_stats, dist)
    skeleton = lazy.model
    block_lin = [f"{adapter.blocks}.{b}.{n}" for b, blk in enumerate(adapter.get_blocks(skeleton))
                 for n, m in blk.named_modules() if isinstance(m, nn.Linear)]
    packer = Packer(fmt, config,
                    linears=[n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)],
                    block_linears=block_lin, groups=adapter.groups,
                    blocks_prefix=adapter.blocks + ".", quantizing=recipe_quantizes(recipe),
                    act_order=recipe_act_order(recipe), save_dtype=lazy.save_dtype,
                    model_class=type(skeleton).__name__)
    partial = partial_dir(out)
    checkpoint = StreamingCheckpoint(partial, lazy, packer, adapter.blocks + ".",
                                     len(adapter.get_blocks(skeleton)), fingerprint, resume,
                                     max_shard_bytes)
    cache_dir = checkpoint.cache_dir if offload_dir is None else (
        offload_dir / f"llmc-{hashlib.sha256(str(partial.resolve()).encode()).hexdigest()[:12]}")
    if dist is not None:  # (a resumed run's saved activations may be the one-process cache)
        cache_dir = cache_dir / "rank0"
    t = time.perf_counter()
    try:
        engine = _stream_engine(lazy, adapter, walk_steps, recipe, dev, the_plan, cache_dir,
                                exact_stats, dist, checkpoint=checkpoint, progress=progress)
        walk = engine.run(windows)
        checkpoint.finish()
        walk.engine["read_ahead"] = the_plan.prefetch
        report = CompressionReport.from_walk(recipe, walk, seconds=time.perf_counter() - t,
                                             calibration=calib_info, plan=the_plan.to_dict())
        _write_extras(partial, tokenizer, recipe, report)
        from llmc.formats.io import move_into_place

        if offload_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
        checkpoint.close()
        move_into_place(partial, out)
    except BaseException:
        try:
            checkpoint.close()  # what the writer thread had in hand is written, or not at all
        except Exception as e:  # the original error matters more
            log.warning("while stopping: %s", e)
        if not checkpoint.has_state:
            shutil.rmtree(partial, ignore_errors=True)
        else:
            log.warning("stopped; %s keeps the finished blocks: rerun the same command with "
                        "--resume to continue, or remove it", partial)
        raise
    if dist is not None:
        dist.barrier()  # every rank returns once the output is in place
    log.info("wrote %s", out)
    return out, report


def _stream_engine(lazy: Any, adapter: Any, walk_steps: list, recipe: Recipe,
                   dev: torch.device, the_plan: Plan, cache_dir: Path, exact_stats: bool,
                   dist: Distributed | None, checkpoint: Any = None,
                   progress: bool = False) -> Engine:
    """The engine of a streamed walk (rank 0's with the output's ``checkpoint``)."""
    options = EngineOptions(dev, the_plan.cache, cache_dir,
                            the_plan.lockstep if the_plan.lockstep != "n/a" else "lockstep",
                            exact_stats=exact_stats)
    dtype = None if reads_as_stored(walk_steps, recipe.kv_cache) else torch.float32
    return Engine(LazyBlocks(lazy, adapter, dev, prefetch=the_plan.prefetch, dtype=dtype),
                  adapter, walk_steps, recipe.walker, options, checkpoint=checkpoint,
                  progress=progress, kv_cache=recipe.kv_cache, dist=dist)


def _follow_stream(out: Path, lazy: Any, adapter: Any, walk_steps: list, recipe: Recipe,
                   windows: Tensor | None, dev: torch.device, the_plan: Plan,
                   offload_dir: Path | None, exact_stats: bool,
                   dist: Distributed) -> tuple[Path, CompressionReport]:
    """A rank other than 0 in a streamed run: the same walk on its own windows, writing
    nothing (rank 0 writes the output); returns once the output is in place."""
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"llmc-rank{dist.rank}-",
                                     dir=offload_dir) as tmp:
        walk = _stream_engine(lazy, adapter, walk_steps, recipe, dev, the_plan, Path(tmp),
                              exact_stats, dist).run(windows)
    dist.barrier()
    return out, CompressionReport.from_walk(recipe, walk, seconds=time.perf_counter() - t,
                                            plan=the_plan.to_dict())


def _write_extras(directory: Path, tokenizer: Any, recipe: Recipe | None,
                  report: CompressionReport | dict | None) -> None:
    from llmc.formats.io import save_json

    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if recipe is not None:
        (directory / RECIPE_FILE).write_text(recipe.to_yaml())
    if report is not None:
        data = report.to_dict() if hasattr(report, "to_dict") else report
        save_json(directory / REPORT_FILE, data)
        try:
            write_html(data, directory)
        except Exception as e:  # the checkpoint matters more than its page: never lose a run
            log.warning("could not draw %s (%s); the JSON report is complete, rebuild the page "
                        "with: llmc report OUT", HTML_FILE, e)


def _compress_whole(model_name: str, recipe: Recipe, out: Path, *, calibration: Any,
                    tokenizer: Any, progress: bool, device: torch.device, fmt: str,
                    overwrite: bool, max_memory: Any, lazy: Any, adapter: Any,
                    trust_remote_code: bool) -> tuple[Path, CompressionReport]:
    """A recipe with a whole-model step (logit distillation): the model is loaded whole, if the
    plan says it fits, compressed in memory and saved."""
    walk_steps, post_steps = _steps(recipe)
    the_plan = _make_plan(lazy.model, adapter, recipe, walk_steps + post_steps,
                          calibration=calibration, device=device, mode="resident",
                          cache="ram", lockstep="auto", max_memory=max_memory,
                          stored_bytes=lazy.bytes_on_disk(), read_bytes=lazy.read_bytes(),
                          save_bytes=lazy.save_dtype.itemsize, out=out, offload_dir=None,
                          probe=False)
    try:
        the_plan.check()
    except ValueError as e:
        raise ValueError(f"logit distillation needs the whole model (and its teacher) in "
                         f"memory: {e}") from None
    model, tok = load_model(model_name, trust_remote_code=trust_remote_code)
    model, report = _compress_resident(model, recipe, tokenizer=tokenizer or tok,
                                       calibration=calibration, progress=progress,
                                       device=device, cache="auto", lockstep="auto",
                                       max_memory=max_memory, offload_dir=None)
    report.plan = the_plan.to_dict()
    save(model, out, tokenizer=tokenizer or tok, report=report, overwrite=overwrite, format=fmt,
         progress=progress)
    return out, report


def distill(
    student: nn.Module,
    teacher: nn.Module,
    recipe: Recipe | dict | str | Path,
    *,
    tokenizer: Any = None,
    calibration: Tensor | CalibrationConfig | None = None,
    progress: bool = True,
) -> tuple[nn.Module, CompressionReport]:
    """Run a recipe of ``distill`` steps on an already compressed ``student`` (e.g. loaded
    with :func:`load`) with ``teacher`` as the teacher; in place. Training and held-out windows
    as for :func:`compress`."""
    recipe = Recipe.coerce(recipe)
    steps = [(i, s, s.compressor()) for i, s in enumerate(recipe.steps)]
    if not all(c.kind == MODEL for _, _, c in steps):
        raise ValueError("distill(): the recipe may only hold distill steps of mode 'logit' "
                         "(block mode runs inside llmc.compress, after the compression steps)")
    n_held = max(s.config.heldout for _, s, _ in steps)
    windows, held, calib_info = _windows(tokenizer, calibration, recipe, n_held)
    t = time.perf_counter()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    previous = getattr(student, "llmc_recipe", None)
    distilled = [{"step": i, "method": s.method,
                  **c.run(student, teacher, windows, held, s, progress=progress)}
                 for i, s, c in steps]
    report = CompressionReport(recipe=recipe.to_dict(), distill=distilled,
                               seconds=time.perf_counter() - t, calibration=calib_info)
    if previous is not None:  # the saved recipe: what made the student, then the distillation
        student.llmc_recipe = Recipe(steps=previous.steps + recipe.steps,
                                     calibration=previous.calibration, walker=previous.walker)
    return student, report


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    dataset: str = "wikitext2",
    split: str = "test",
    seqlen: int = 2048,
    windows: int | None = None,
    *,
    tasks: str | list[str] | PreparedTasks | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    perplexity: bool | None = None,
    batch_size: int = 1,
    progress: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Perplexity with the GPTQ protocol (see the README: non-overlapping windows of
    ``seqlen`` over the joined split, the first ``windows`` of them when given), and with
    ``tasks`` lm-eval's task scores (:func:`llmc.eval.tasks.evaluate_tasks`; ``limit``
    documents per task, ``num_fewshot``, task YAMLs under ``include_path``) on the same model
    object: ``"tasks"`` holds ``{"task/metric": value}`` and ``"lm_eval"`` lm-eval's own
    results with their stderr. With tasks, perplexity is measured too only when
    ``perplexity`` is true."""
    out: dict[str, Any] = {}
    if perplexity or (perplexity is None and tasks is None):
        out.update(evaluate_text(model, tokenizer, dataset, split, seqlen, windows,
                                 batch_size=batch_size, progress=progress, **kwargs))
    if tasks is not None:
        result = evaluate_tasks(model, tokenizer, tasks, limit=limit, num_fewshot=num_fewshot,
                                batch_size=batch_size, include_path=include_path)
        out["tasks"] = task_scores(result)
        out["lm_eval"] = result
    return out


def save(
    model: nn.Module,
    out: str | Path,
    *,
    tokenizer: Any = None,
    report: CompressionReport | dict | None = None,
    overwrite: bool = False,
    format: str | None = None,
    progress: bool = False,
) -> Path:
    """Write ``model`` to ``out``: the HF GPTQ, AWQ or compressed-tensors layout (``format``;
    default: awq after a 4-bit awq recipe, else gptq) when it holds quantized Linears, a dense
    safetensors checkpoint otherwise (unquantized tensors in ``model.config.dtype``); plus the
    tokenizer, ``recipe.yaml`` and the report. Written to a temporary directory and moved into
    place when complete."""
    from llmc.formats.checkpoint import default_format, write_model
    from llmc.formats.io import atomic_output_dir

    out = Path(out)
    recipe = getattr(model, "llmc_recipe", None)
    fmt = format or default_format(recipe)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_model(model, tmp, fmt=fmt, progress=progress)
        _write_extras(tmp, tokenizer, recipe, report)
    log.info("wrote %s", out)
    return out


def load(path: str | Path, *, packed: bool = False, trust_remote_code: bool = False,
         progress: bool = False, native_layout: bool = False) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from an llmc, GPTQ, AWQ or compressed-tensors checkpoint (dequantized
    on CPU, each quantized Linear keeping its integer form; with ``packed``, as
    :class:`llmc.nn.QuantLinear` modules that keep the packed codes and call the kernels), any
    HF model directory or id, a GGUF file or a demo name. ``native_layout`` (with ``packed``)
    also builds each 4-bit layer's kernel-native layout and runs on it, the Linears of a block
    that read the same input (q/k/v, gate/up) fused into one weight (see docs/kernels.md; not
    yet run on a GPU)."""
    from llmc.formats.checkpoint import is_llmc_checkpoint, read_model

    if native_layout and not packed:
        raise ValueError("native_layout needs packed=True: it is built from the packed codes")
    p = Path(path)
    if p.is_dir() and is_llmc_checkpoint(p):
        from transformers import AutoTokenizer

        model = read_model(p, packed=packed, progress=progress)
        if native_layout:
            from llmc.nn import use_native_layout

            fuse_siblings(model)  # first: the fused members need no layout of their own
            if not use_native_layout(model):
                raise ValueError(f"{p} has no 4-bit quantized layer to put in the native "
                                 "layout")
        tok = None
        if (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(p))
        recipe_file = p / RECIPE_FILE
        if recipe_file.is_file():
            model.llmc_recipe = Recipe.from_yaml(recipe_file)
        return model, tok
    return load_model(str(path), trust_remote_code=trust_remote_code)


def fuse_siblings(model: nn.Module) -> int:
    """:func:`llmc.nn.fuse_native` on every block's groups of Linears that read the same input
    (the architecture's, as the walker finds them); none where its structure cannot be read."""
    from llmc.nn import fuse_native

    try:
        adapter = get_adapter(model.config)
    except ValueError as e:
        log.info("native layout: Linears left unfused (%s)", e)
        return 0
    groups = [[f"{adapter.blocks}.{b}.{n}" for n in g]
              for b in range(len(adapter.get_blocks(model))) for g in adapter.groups]
    return fuse_native(model, groups)


def read_report(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / REPORT_FILE).read_text())
