"""The public functions: ``compress``, ``evaluate``, ``save``, ``load``."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmc.calibration import CalibrationConfig, calibration_windows, heldout_windows
from llmc.eval.perplexity import evaluate_text
from llmc.models import get_adapter, load_model
from llmc.recipe import Recipe
from llmc.walker import LayerWalker, WalkReport

log = logging.getLogger(__name__)

REPORT_FILE = "llmc_report.json"
RECIPE_FILE = "recipe.yaml"


@dataclass
class CompressionReport:
    """What ``compress`` did: per-layer relative output error (and sparsity, when pruned), time
    per block, what each block transform chose (AWQ: per pair the exponent and the losses),
    what a planning pass chose (OWL: per block the outlier ratio and sparsity), what each
    distill step did (held-out KL before and at the best step, its history), totals."""

    recipe: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    transforms: list[dict[str, Any]] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)
    distill: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    capture_seconds: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def compress(
    model: nn.Module,
    recipe: Recipe | dict | str | Path,
    *,
    tokenizer: Any = None,
    calibration: Tensor | CalibrationConfig | None = None,
    progress: bool = True,
) -> tuple[nn.Module, CompressionReport]:
    """Compress ``model`` in place with ``recipe`` and return it with a report.

    ``calibration`` is a token-id tensor [samples, seqlen], a ``CalibrationConfig``, or None
    for the recipe's own ``calibration`` section (read with ``tokenizer``).
    """
    recipe = Recipe.coerce(recipe)
    adapter = get_adapter(model.config)
    recipe.check_model(model.config)
    dtypes = {p.dtype for b in adapter.get_blocks(model) for p in b.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(
            f"compress() needs the blocks in float32 (found {sorted(map(str, dtypes))}): the "
            "quantized weights are kept dense and exact on their grid until export; load the "
            "model with dtype=torch.float32 (block forwards still run in the walker's dtype)"
        )
    model.eval()
    steps = [(i, s, s.compressor()) for i, s in enumerate(recipe.steps)]
    walk_steps = [st for st in steps if not getattr(st[2], "post_walk", False)]
    post_steps = [st for st in steps if getattr(st[2], "post_walk", False)]
    windows, held, calib_info = None, None, {}
    if recipe.needs_calibration:
        n_held = max((s.config.heldout for _, s, _ in post_steps), default=0)  # logit mode
        windows, held, calib_info = _windows(tokenizer, calibration, recipe, n_held)
        recipe.check_seqlen(model.config, windows.shape[1])
    t = time.perf_counter()
    # The teacher of the distill steps: the model before any compression step (a copy).
    teacher = None
    if post_steps:
        from llmc.distill import snapshot_teacher

        teacher = snapshot_teacher(model)
    walk = LayerWalker(model, adapter, walk_steps, recipe.walker, progress=progress).run(
        windows) if walk_steps else WalkReport()
    distilled = []
    for idx, step, comp in post_steps:
        record = comp.run(model, teacher, windows, held, step, progress=progress)
        distilled.append({"step": idx, "method": step.method, **record})
    del teacher
    report = CompressionReport(
        recipe=recipe.to_dict(),
        layers=[asdict(r) for r in walk.layers],
        blocks=walk.blocks,
        transforms=walk.transforms,
        plans=walk.plans,
        distill=distilled,
        seconds=time.perf_counter() - t,
        capture_seconds=walk.capture_seconds,
        calibration=calib_info,
    )
    model.llmc_recipe = recipe
    return model, report


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
    if not all(getattr(c, "post_walk", False) for _, _, c in steps):
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


# Perplexity with the GPTQ protocol (see the README): non-overlapping windows of ``seqlen``
# over the joined split, the first ``windows`` of them when given.
evaluate = evaluate_text


def save(
    model: nn.Module,
    out: str | Path,
    *,
    tokenizer: Any = None,
    report: CompressionReport | dict | None = None,
    overwrite: bool = False,
    format: str | None = None,
) -> Path:
    """Write ``model`` to ``out``: the HF GPTQ or AWQ layout (``format``; default: awq after a
    4-bit awq recipe, else gptq) when it holds quantized Linears, a dense safetensors
    checkpoint otherwise; plus the tokenizer, ``recipe.yaml`` and the report. Written to a
    temporary directory and moved into place when complete."""
    from llmc.formats.checkpoint import default_format, write_model
    from llmc.formats.io import atomic_output_dir, save_json

    out = Path(out)
    recipe = getattr(model, "llmc_recipe", None)
    fmt = format or default_format(recipe)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_model(model, tmp, fmt=fmt)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe is not None:
            (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
        if report is not None:
            save_json(tmp / REPORT_FILE, report.to_dict() if hasattr(report, "to_dict") else report)
    log.info("wrote %s", out)
    return out


def load(path: str | Path, *, packed: bool = False,
         trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from an llmc, GPTQ, AWQ or compressed-tensors checkpoint (dequantized
    on CPU, each quantized Linear keeping its integer form; with ``packed``, as
    :class:`llmc.nn.QuantLinear` modules that keep the packed codes and call the kernels), any
    HF model directory or id, a GGUF file or a demo name."""
    from llmc.formats.checkpoint import is_llmc_checkpoint, read_model

    p = Path(path)
    if p.is_dir() and is_llmc_checkpoint(p):
        from transformers import AutoTokenizer

        model = read_model(p, packed=packed)
        tok = None
        if (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(p))
        recipe_file = p / RECIPE_FILE
        if recipe_file.is_file():
            model.llmc_recipe = Recipe.from_yaml(recipe_file)
        return model, tok
    return load_model(str(path), trust_remote_code=trust_remote_code)


def read_report(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / REPORT_FILE).read_text())
