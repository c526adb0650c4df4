"""Task accuracy through lm-eval-harness (the ``lm-eval`` package, the ``eval`` extra).

The model llmc holds (dense, pruned, dequantized or packed) is handed to lm-eval's ``HFLM`` as a
model object, never re-loaded, so lm-eval scores exactly the weights llmc evaluates. Tasks are
lm-eval's own names (``arc_easy``, ``hellaswag``, ...), tasks found under ``include_path``, or a
task YAML file: its relative ``data_files`` are read next to the file, so a YAML over a local
JSONL works offline. :func:`prepare_tasks` checks the names and loads each task's data before
any model loads; a task lm-eval does not know, or data it cannot reach, is a one-line
``ValueError``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

INSTALL = "task evaluation needs lm-eval: pip install 'llmc-compress[eval]'"
# what lm-eval returns that goes into llmc's JSON (the rest is environment and git details)
RESULT_KEYS = ("results", "groups", "group_subtasks", "versions", "n-shot", "n-samples",
               "higher_is_better")


@dataclass
class PreparedTasks:
    """Task specs lm-eval accepts (names, or configs of YAML files), checked and loaded once,
    with the task manager that found them."""

    specs: list[str | dict[str, Any]]
    names: list[str]
    manager: Any


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ImportError(INSTALL) from None
    return lm_eval


def split_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]``."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    out = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not out:
        raise ValueError("no task given: pass lm-eval task names, e.g. --tasks arc_easy,hellaswag")
    return out


def _task_file(path: Path) -> dict[str, Any]:
    """The config of a task YAML file, its relative data files made absolute (next to it)."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not a plain YAML task file ({str(e).splitlines()[0]}); for "
                         "tasks with !function tags pass --include-path with the task's "
                         "directory and the task's name") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise ValueError(f"{path}: an lm-eval task file needs a 'task: NAME' key")
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is not None:
        def absolute(f: str) -> str:
            p = Path(os.path.expanduser(f))
            p = p if p.is_absolute() else path.parent / p
            if not p.is_file():
                raise ValueError(f"{path}: data file {f} not found (looked for {p})")
            return str(p)

        if isinstance(files, str):
            files = absolute(files)
        elif isinstance(files, list):
            files = [absolute(f) for f in files]
        elif isinstance(files, dict):
            files = {k: absolute(v) if isinstance(v, str) else [absolute(f) for f in v]
                     for k, v in files.items()}
        config = {**config, "dataset_kwargs": {**kwargs, "data_files": files}}
    return config


def prepare_tasks(tasks: str | Sequence[str], *,
                  include_path: str | Path | None = None) -> PreparedTasks:
    """Resolve and load ``tasks`` (names or YAML files) before any model loads; a one-line
    ``ValueError`` names a task lm-eval does not know (with the closest names) or whose data it
    cannot load."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path}: not a directory")
    names = split_tasks(tasks)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    files_only = all(n.endswith((".yaml", ".yml")) for n in names)
    # lm-eval's own index of its thousands of task files takes seconds: only when named
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=not files_only)
    known = set(manager.all_tasks)
    specs: list[str | dict[str, Any]] = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            path = Path(name)
            if not path.is_file():
                raise ValueError(f"task file not found: {name}")
            specs.append(_task_file(path))
        elif name in known:
            specs.append(name)
        else:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"lm-eval does not know the task '{name}'{hint} (a task of your "
                             "own: pass its YAML file, or --include-path with its directory)")
    try:
        manager.load(specs)  # builds each task: its data is read (or downloaded) now
    except Exception as e:  # lm-eval and datasets raise many kinds; all mean "cannot load"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"lm-eval could not load the data of {', '.join(names)}: {first}; "
                         "offline, use a task YAML over a local file") from None
    return PreparedTasks(specs=specs, names=[s if isinstance(s, str) else s["task"]
                                             for s in specs], manager=manager)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def evaluate_tasks(model: nn.Module, tokenizer: Any, tasks: PreparedTasks | str | Sequence[str],
                   *, limit: int | float | None = None, num_fewshot: int | None = None,
                   batch_size: int = 1, include_path: str | Path | None = None,
                   log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's scores of ``model`` (any ``transformers`` causal LM, on its own device) on
    ``tasks``: ``{"results": {task: {"acc,none": ..., "acc_stderr,none": ...}}, "n-shot":
    ..., "n-samples": ..., "versions": ..., "lm_eval_version": ..., "limit": ...}``, the
    numbers as lm-eval gives them; with ``log_samples`` also its per-document ``samples``
    (each answer's log-likelihood)."""
    if tokenizer is None:
        raise ValueError("task evaluation needs the model's tokenizer")
    if not isinstance(tasks, PreparedTasks):
        tasks = prepare_tasks(tasks, include_path=include_path)
    if limit is not None and limit <= 0:
        raise ValueError("limit must be positive")
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    # HFLM warns that a model object (not a name) was passed: that is the point here
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        # lm-eval prints some progress (bootstrapping) on stdout: keep stdout for results
        with contextlib.redirect_stdout(sys.stderr):
            out = lm_eval.simple_evaluate(
                model=lm, tasks=tasks.specs, task_manager=tasks.manager, limit=limit,
                num_fewshot=num_fewshot, log_samples=log_samples)  # lm-eval's own seeds
    finally:
        model.train(was_training)
        hf_log.setLevel(level)
    result = {k: out[k] for k in RESULT_KEYS if k in out}
    if log_samples:
        result["samples"] = out.get("samples", {})
    result.update(lm_eval_version=out.get("lm_eval_version"), limit=limit, tasks=tasks.names)
    return _jsonable(result)


def task_scores(result: dict[str, Any]) -> dict[str, float]:
    """``{"task/metric": value}`` of an :func:`evaluate_tasks` result: every metric lm-eval
    reports except the stderr entries, e.g. ``{"arc_easy/acc": 0.41, "arc_easy/acc_norm":
    0.38}``."""
    scores = {}
    for task, metrics in result.get("results", {}).items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if isinstance(value, (int, float)) and "_stderr" not in metric and metric not in (
                    "sample_len", "sample_count"):
                scores[f"{task}/{metric}"] = float(value)
    return scores


def task_stderr(result: dict[str, Any], name: str) -> float | None:
    """The stderr lm-eval gives for ``"task/metric"``, if any."""
    task, metric = name.split("/", 1)
    for key, value in result.get("results", {}).get(task, {}).items():
        if key.split(",")[0] == f"{metric}_stderr" and isinstance(value, (int, float)):
            return float(value)
    return None
