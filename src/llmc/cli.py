"""The ``llmc`` command line: each command is a few lines over the public API."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from llmc.calibration import CalibrationConfig
from llmc.engine.config import DTYPES, WalkerConfig
from llmc.recipe import SCHEME_PRESETS

log = logging.getLogger("llmc")

_CAL = CalibrationConfig()
EXPORT_FORMATS = ["gptq", "awq", "compressed-tensors"]


def calibration_options(f):
    """--dataset/--samples/--seqlen/--seed, shared by every compressing command."""
    opts = [
        click.option("--dataset", default=None,
                     help=f"Calibration data: wikitext2, c4, a .txt/.jsonl file or an HF dataset "
                          f"id [default: {_CAL.dataset}, or the recipe's]"),
        click.option("--samples", type=int, default=None,
                     help=f"Calibration windows [default: {_CAL.samples}, or the recipe's]"),
        click.option("--seqlen", type=int, default=None,
                     help=f"Tokens per window [default: {_CAL.seqlen}, or the recipe's]"),
        click.option("--seed", type=int, default=None,
                     help=f"Seed of the window draw [default: {_CAL.seed}, or the recipe's]"),
        click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
                     help="dtype of the block forwards during calibration (weights and Hessians "
                          "stay float32) [default: bfloat16, or the recipe's]"),
        click.option("--batch-size", type=int, default=None,
                     help="Calibration windows per forward chunk [default: 8, or the recipe's]"),
        click.option("--all-experts", is_flag=True,
                     help="MoE: every calibration token through every expert for the "
                          "statistics (the block's output keeps only the routed ones)"),
        click.option("--min-expert-tokens", type=int, default=None,
                     help="MoE: an expert whose statistics saw fewer rows is compressed "
                          "without data (GPTQ -> RTN) [default: 32, or the recipe's]"),
        click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
                     help="Output directory (written atomically)"),
        click.option("--overwrite", is_flag=True, help="Replace an existing output directory"),
        click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default=None,
                     help="Checkpoint layout of quantized models [default: awq after a 4-bit "
                          "awq step, else gptq]"),
        click.option("--trust-remote-code", is_flag=True,
                     help="Allow model code from the model's repository to run"),
        click.option("--quiet", is_flag=True, help="No progress bars or logs"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def engine_options(f):
    """--device, --max-memory, --offload-dir, --cache, --lockstep, --resume, --dry-run, --json:
    how the compressing commands stream a model through the engine."""
    opts = [
        click.option("--device", default="auto", show_default=True,
                     help="Where blocks are compressed: auto (the first CUDA device, else the "
                          "CPU), cpu, cuda or cuda:N"),
        click.option("--max-memory", default=None,
                     help="RAM the run may use, e.g. 48GiB [default: what the machine, or its "
                          "cgroup, has free]; the plan refuses to start past it"),
        click.option("--offload-dir", type=click.Path(path_type=Path), default=None,
                     help="Directory for the activation cache when the plan puts it on disk "
                          "[default: inside the output's temporary directory]"),
        click.option("--cache", "cache_place", type=click.Choice(["auto", "ram", "disk"]),
                     default="auto", show_default=True,
                     help="Where the activation cache lives (auto: the plan chooses)"),
        click.option("--lockstep", type=click.Choice(["auto", "lockstep", "replay"]),
                     default="auto", show_default=True,
                     help="True-sequential groups: one pass with every chunk paused at each "
                          "group, or a replay pass per group (auto: the plan chooses)"),
        click.option("--resume", is_flag=True,
                     help="Continue an interrupted run into the same output"),
        click.option("--exact-stats", is_flag=True,
                     help="Sum calibration statistics in float64, so that a run over any "
                          "number of torchrun processes gives the checkpoint of one"),
        click.option("--dry-run", is_flag=True,
                     help="Print the plan (memory, disk, time) and stop before any weight loads"),
        click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _errors(f):
    """Bad input exits non-zero with a one-line reason, never a traceback."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except (ValueError, OSError, ImportError) as e:
            raise click.ClickException(
                str(e).splitlines()[0] if str(e) else type(e).__name__
            ) from None
        except KeyboardInterrupt:
            click.echo("interrupted; the output was not written", err=True)
            sys.exit(130)

    return wrapper


def _with_overrides(recipe, opts: dict[str, Any]):
    from llmc.recipe import Recipe

    cal = {k: opts[k] for k in ("dataset", "samples", "seqlen", "seed") if opts.get(k) is not None}
    walk = {k: opts[k] for k in ("dtype", "batch_size", "all_experts", "min_expert_tokens")
            if opts.get(k) is not None and opts.get(k) is not False}  # False: flag not given
    data = recipe.to_dict()
    data["calibration"].update(cal)
    data["walker"].update(walk)
    return Recipe.from_dict(data)


def _run(model_name: str, recipe, opts: dict[str, Any]) -> None:
    """Plan (or with --dry-run only print the plan), then stream the model through the
    engine into the output."""
    from llmc import api

    common = {"device": opts["device"], "format": opts["fmt"],
              "max_memory": opts["max_memory"], "offload_dir": opts["offload_dir"],
              "cache": opts["cache_place"], "lockstep": opts["lockstep"],
              "trust_remote_code": opts["trust_remote_code"]}
    if opts["dry_run"]:
        plan = api.plan(model_name, recipe, out=opts["output"], **common)
        click.echo(json.dumps(plan.to_dict(), indent=2) if opts["as_json"] else plan.render())
        if not plan.fits():
            raise click.ClickException("this run would be refused: " + "; ".join(plan.problems()))
        return
    out, report = api.compress(model_name, recipe, out=opts["output"],
                               overwrite=opts["overwrite"], resume=opts["resume"],
                               progress=not opts["quiet"], exact_stats=opts["exact_stats"],
                               **common)
    if _rank() == 0:
        click.echo(f"compressed in {report.seconds:.1f} s; wrote {out}", err=True)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@click.group()
@click.version_option(package_name="llmc-compress")
def cli() -> None:
    """llmc: compress large language models (GPTQ/AWQ/RTN quantization, SparseGPT/Wanda/
    magnitude pruning, evaluation)."""


@cli.command()
@click.argument("model")
@click.option("--method", type=click.Choice(["gptq", "rtn", "awq", "awq+gptq", "signround",
                                            "awq+signround", "smoothquant+gptq",
                                            "smoothquant+rtn"]), default=None,
              help="Quantization method (awq: AWQ scales then RTN; awq+gptq: AWQ scales then "
                   "GPTQ, in one walk; signround: learned rounding, block by block; "
                   "smoothquant+...: SmoothQuant scales first, for 8-bit activations) "
                   "[default: gptq; rtn for --scheme fp8-dynamic, data-free]")
@click.option("--scheme", type=click.Choice(sorted(SCHEME_PRESETS)), default=None,
              help="A named scheme: w4a16 (the --bits/--group-size default), w8a16, "
                   "nvfp4 (NVFP4 weights: E2M1 in groups of 16, E4M3 scales), nvfp4-w4a4 "
                   "(NVFP4 weights and activations), mxfp4 (E2M1 in groups of 32, "
                   "power-of-two scales), mxfp4-w4a4 (MXFP4 weights and activations), "
                   "w8a8-int8 (INT8 weights per channel, INT8 activations per token), "
                   "fp8-dynamic (FP8 E4M3 weights per channel, FP8 activations per token), "
                   "w8a8-int8-static and fp8-static (one activation scale per Linear, "
                   "calibrated); "
                   "sets --bits and --group-size")
@click.option("--alpha", type=float, default=None,
              help="SmoothQuant migration strength [default: 0.8]")
@click.option("--kv-cache", type=click.Choice(["fp8", "fp8-head"]), default=None,
              help="Also quantize the KV cache to FP8 E4M3 with static scales calibrated on the "
                   "calibration windows: one per tensor (fp8) or per key/value head (fp8-head) "
                   "[default: not quantized]")
@click.option("--bits", type=int, default=4, show_default=True, help="Bits per weight (2-8)")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Input columns per scale; -1 for one scale per output channel")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric or asymmetric")
@click.option("--full-range", is_flag=True,
              help="Symmetric integer grids: the largest magnitude of each group on the grid's "
                   "long end (-2^(bits-1)), a finer step (llama.cpp's and AutoRound's grid) "
                   "[default: 2 max|w| / (2^bits - 1)]")
@click.option("--act-order", type=click.Choice(["none", "static", "dynamic"]), default="static",
              show_default=True, help="GPTQ column order (static: desc diag(H), original groups)")
@click.option("--damp", type=float, default=0.01, show_default=True,
              help="GPTQ damping, a fraction of the Hessian's mean diagonal")
@click.option("--clip/--no-clip", default=None,
              help="Search each group's clipping range [default: on for gptq and awq, off for "
                   "rtn; with awq+gptq, GPTQ's search]")
@click.option("--preset", "rounding", type=click.Choice(["fast", "default", "best"]), default=None,
              help="signround: 50, 200 or 500 signed-gradient steps per block [default: "
                   "default]")
@click.option("--iters", type=int, default=None,
              help="signround: steps per block (overrides --preset)")
@click.option("--tokens", type=float, default=None,
              help="signround: the fraction of each step's tokens its loss is taken on, the "
                   "MLP run on those only (overrides --preset)")
@click.option("--init", "init", type=click.Choice(["rtn", "gptq"]), default=None,
              help="signround: start from round-to-nearest or from GPTQ's rounding "
                   "[default: rtn]")
@calibration_options
@engine_options
@_errors
def quantize(model: str, method: str | None, scheme: str | None, alpha: float | None,
             kv_cache: str | None, bits: int, group_size: int, sym: bool, full_range: bool,
             act_order: str,
             damp: float, clip: bool | None, rounding: str | None, iters: int | None,
             tokens: float | None, init: str | None, **opts: Any) -> None:
    """Quantize MODEL (a demo name such as smollm2-135m, an HF id or directory, or a .gguf
    file) and write a checkpoint to -o."""
    from llmc.recipe import Recipe

    _setup_logging(opts["quiet"])
    preset = dict(SCHEME_PRESETS[scheme]) if scheme else {}
    if method is None:
        method = "rtn" if scheme == "fp8-dynamic" else "gptq"
    if alpha is not None and not method.startswith("smoothquant"):
        raise click.UsageError("--alpha is SmoothQuant's; use --method smoothquant+gptq or "
                               "smoothquant+rtn")
    learned = {k: v for k, v in (("preset", rounding), ("iters", iters), ("tokens", tokens),
                                 ("init", init)) if v is not None}
    if learned and not method.endswith("signround"):
        raise click.UsageError(f"--{next(iter(learned))} is signround's; use --method signround "
                               "or awq+signround")
    args: dict[str, Any] = {"bits": bits, "group_size": group_size, "sym": sym, **preset,
                            **({"full_range": True} if full_range else {})}
    gptq = {**args, "act_order": act_order, "damp": damp}
    clipping = {} if clip is None else {"clip": clip}
    smooth = {"method": "smoothquant", "args": {} if alpha is None else {"alpha": alpha}}
    scheme_args = args
    if method.endswith("signround") and ("act_bits" in preset or "type" in preset):
        raise click.UsageError(f"--scheme {scheme}: signround learns integer weight rounding "
                               "only; use --method gptq or rtn")
    if method.startswith("awq") and ("act_bits" in preset or "type" in preset):
        raise click.UsageError(f"--scheme {scheme} quantizes activations or FP8 weights, which "
                               "AWQ's scales are not searched for; use --method gptq, rtn or "
                               "smoothquant+gptq")
    steps = {
        "gptq": [{"method": "gptq", "args": {**gptq, **clipping}}],
        "rtn": [{"method": "rtn", "args": {**scheme_args, **clipping}}],
        "awq": [{"method": "awq", "args": {**scheme_args, **clipping}}],
        "awq+gptq": [{"method": "awq", "args": scheme_args},
                     {"method": "gptq", "args": {**gptq, **clipping}}],
        "signround": [{"method": "signround", "args": {**scheme_args, **learned, **clipping}}],
        "awq+signround": [{"method": "awq", "args": scheme_args},
                          {"method": "signround", "args": {**scheme_args, **learned,
                                                           **clipping}}],
        "smoothquant+gptq": [smooth, {"method": "gptq", "args": {**gptq, **clipping}}],
        "smoothquant+rtn": [smooth, {"method": "rtn", "args": {**scheme_args, **clipping}}],
    }[method]
    kv = {} if kv_cache is None else {
        "kv_cache": {"strategy": "attn_head" if kv_cache == "fp8-head" else "tensor"}}
    recipe = _with_overrides(Recipe.from_dict({"steps": steps, **kv}), opts)
    _run(model, recipe, opts)


@cli.command()
@click.argument("model")
@click.option("--method", type=click.Choice(["sparsegpt", "wanda", "magnitude"]),
              default="sparsegpt", show_default=True, help="Pruning method")
@click.option("--sparsity", type=float, default=0.5, show_default=True,
              help="Fraction of each targeted Linear's weights set to zero (unstructured)")
@click.option("--pattern", default=None,
              help="N:M semi-structured sparsity instead, e.g. 2:4 (N kept of every M inputs)")
@click.option("--scope", type=click.Choice(["row", "layer"]), default=None,
              help="Rank unstructured weights per output row or over the layer [default: row "
                   "for wanda, layer for sparsegpt and magnitude]")
@click.option("--owl", is_flag=True,
              help="Outlier-weighted layerwise sparsity: per-block ratios around --sparsity")
@click.option("--bits", type=int, default=None,
              help="Also quantize: sparsegpt quantizes in the same pass, wanda and magnitude "
                   "are followed by GPTQ [default: no quantization]")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="With --bits: input columns per scale; -1 for one per output channel")
@click.option("--sym/--asym", default=True, show_default=True,
              help="With --bits: symmetric or asymmetric")
@calibration_options
@engine_options
@_errors
def prune(model: str, method: str, sparsity: float, pattern: str | None, scope: str | None,
          owl: bool, bits: int | None, group_size: int, sym: bool, **opts: Any) -> None:
    """Prune MODEL (a demo name, an HF id or directory, or a .gguf file) and write a checkpoint
    to -o: dense safetensors with its zeros, or a quantized layout with --bits."""
    from llmc.recipe import Recipe

    _setup_logging(opts["quiet"])
    args: dict[str, Any] = {"sparsity": sparsity, "owl": owl}
    if pattern:
        args["pattern"] = pattern
    if scope:
        args["scope"] = scope
    scheme = {"bits": bits, "group_size": group_size, "sym": sym}
    steps = [{"method": method, "args": args}]
    if bits is not None and method == "sparsegpt":
        args.update(scheme)
    elif bits is not None:
        steps.append({"method": "gptq", "args": scheme})
    recipe = _with_overrides(Recipe.from_dict({"steps": steps}), opts)
    _run(model, recipe, opts)


@cli.command()
@click.argument("model")
@click.option("--recipe", "recipe_path", required=True, type=click.Path(path_type=Path),
              help="Recipe YAML file")
@calibration_options
@engine_options
@_errors
def compress(model: str, recipe_path: Path, **opts: Any) -> None:
    """Compress MODEL with the steps of a recipe file and write the result to -o."""
    from llmc.recipe import Recipe

    _setup_logging(opts["quiet"])
    recipe = _with_overrides(Recipe.from_yaml(recipe_path), opts)
    _run(model, recipe, opts)


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--compare", is_flag=True,
              help="Evaluate every MODEL on the same windows and tasks and print one table "
                   "(perplexity, each task, size on disk, bits per weight)")
@click.option("--dataset", default="wikitext2", show_default=True,
              help="Evaluation text: wikitext2 is the raw Wikitext-2 test split of the GPTQ "
                   "protocol (wiki.test.raw); or a .txt/.jsonl file or an HF dataset id")
@click.option("--split", default="test", show_default=True, help="Split of the dataset")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per window")
@click.option("--windows", type=int, default=None,
              help="Evaluate only the first N windows [default: all]")
@click.option("--tasks", default=None,
              help="lm-eval tasks, comma-separated: lm-eval's names (arc_easy,hellaswag,...), "
                   "tasks under --include-path, or task YAML files (needs the eval extra)")
@click.option("--limit", type=float, default=None,
              help="Tasks: the first N documents of each (a fraction below 1) [default: all]")
@click.option("--num-fewshot", type=int, default=None,
              help="Tasks: few-shot examples [default: each task's own]")
@click.option("--include-path", type=click.Path(path_type=Path), default=None,
              help="A directory of lm-eval task YAML files of your own")
@click.option("--perplexity/--no-perplexity", "with_ppl", default=None,
              help="Measure perplexity too [default: yes, except with --tasks on one model]")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="Windows (perplexity) or requests (tasks) per forward")
@click.option("--device", default="cpu", show_default=True,
              help="Where the model runs: cpu, cuda, cuda:N or auto")
@click.option("--packed", is_flag=True,
              help="Quantized checkpoints: keep the packed codes and run the kernels "
                   "(QuantLinear) instead of dequantized weights")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON on stdout (one object; with --compare a list)")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code to run")
@_errors
def evaluate(models: tuple[str, ...], compare: bool, dataset: str, split: str, seqlen: int,
             windows: int | None, tasks: str | None, limit: float | None,
             num_fewshot: int | None, include_path: Path | None, with_ppl: bool | None,
             batch_size: int, device: str, packed: bool, as_json: bool,
             trust_remote_code: bool) -> None:
    """Perplexity and lm-eval task scores of MODEL (an llmc output, HF directory or id, .gguf
    file or demo name); with --compare, of several models in one table."""
    from llmc import api
    from llmc.calibration import load_rows
    from llmc.engine.config import resolve_device
    from llmc.eval.compare import footprint, markdown_table
    from llmc.eval.perplexity import eval_dataset
    from llmc.eval.tasks import prepare_tasks, task_stderr
    from llmc.models import resolve

    _setup_logging(as_json)
    if len(models) > 1 and not compare:
        raise click.UsageError("several models: pass --compare to evaluate them in one table")
    if seqlen < 2:
        raise ValueError("--seqlen must be at least 2")
    if windows is not None and windows < 1:
        raise ValueError("--windows must be at least 1")
    if limit is not None and limit <= 0:
        raise ValueError("--limit must be positive")
    if tasks is None and (limit, num_fewshot, include_path) != (None, None, None):
        raise click.UsageError("--limit, --num-fewshot and --include-path apply to --tasks")
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    dev = resolve_device(device)
    with_ppl = (tasks is None or compare) if with_ppl is None else with_ppl
    if not with_ppl and tasks is None:
        raise click.UsageError("--no-perplexity needs --tasks: there is nothing else to measure")
    limit_n = None if limit is None else (int(limit) if limit >= 1 else limit)
    # every input is checked before the first model loads
    for name in models:
        resolve(name)
    if with_ppl:
        load_rows(eval_dataset(dataset, split), split)
    prepared = prepare_tasks(tasks, include_path=include_path) if tasks else None
    rows = []
    for name in models:
        m, tok = api.load(name, packed=packed, trust_remote_code=trust_remote_code,
                          progress=not as_json)
        if tok is None:
            raise ValueError(f"{name} has no tokenizer files")
        m.to(dev)
        res = api.evaluate(m, tok, dataset=dataset, split=split, seqlen=seqlen, windows=windows,
                           tasks=prepared, limit=limit_n, num_fewshot=num_fewshot,
                           perplexity=with_ppl, batch_size=batch_size, progress=not as_json)
        res = {"model": name, **({"dataset": dataset, "split": split} if with_ppl else {}),
               **res}
        if compare:
            res.update(footprint(name, m))
            res["stderr"] = {k: task_stderr(res["lm_eval"], k) for k in res.get("tasks", {})}
        rows.append(res)
        del m
    if as_json:
        click.echo(json.dumps(rows if compare else rows[0]))
    elif compare:
        click.echo(markdown_table(rows))
    else:
        res = rows[0]
        if with_ppl:
            click.echo(f"perplexity {res['perplexity']:.4f} over {res['windows']} windows of "
                       f"{seqlen} tokens ({res['seconds']:.1f} s)")
        for key, value in res.get("tasks", {}).items():
            err = task_stderr(res["lm_eval"], key)
            click.echo(f"{key} {value:.4f}" + ("" if err is None else f" ± {err:.4f}"))


@cli.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--no-plots", is_flag=True, help="Tables only (no matplotlib)")
@_errors
def report(output: Path, no_plots: bool) -> None:
    """Rebuild OUTPUT/llmc_report.html, the run's page, from OUTPUT/llmc_report.json."""
    from llmc.report import rebuild

    click.echo(f"wrote {rebuild(output, plots=not no_plots)}", err=True)


@cli.command()
@click.argument("source")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="Checkpoint layout to write")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output directory (written atomically)")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory")
@_errors
def export(source: str, fmt: str, output: Path, overwrite: bool) -> None:
    """Rewrite an llmc output (GPTQ, AWQ, compressed-tensors or dense pruned checkpoint) in
    another layout; config, tokenizer, recipe and report come along."""
    from llmc import api
    from llmc.formats.checkpoint import is_llmc_checkpoint

    _setup_logging(True)
    src = Path(source)
    if not (src.is_dir() and is_llmc_checkpoint(src)):
        raise ValueError(f"{source} is not an llmc, GPTQ, AWQ or compressed-tensors checkpoint "
                         "directory")
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"{output} exists; pass --overwrite to replace it")
    if output.resolve() == src.resolve():
        raise ValueError("the output must not be the source directory")
    model, tok = api.load(src, progress=True)
    report = api.read_report(src) if (src / api.REPORT_FILE).is_file() else None
    api.save(model, output, tokenizer=tok, report=report, overwrite=overwrite, format=fmt,
             progress=True)
    click.echo(f"wrote {output} ({fmt})", err=True)


@cli.command()
@click.argument("student")
@click.option("--teacher", required=True,
              help="The uncompressed model (demo name, HF id or directory, or .gguf file)")
@click.option("--steps", type=int, default=100, show_default=True, help="Optimizer steps")
@click.option("--lr", type=float, default=1e-5, show_default=True, help="AdamW learning rate")
@click.option("--train-batch", type=int, default=4, show_default=True,
              help="Training windows per step")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Softmax temperature of the KL term")
@click.option("--topk", type=int, default=0, show_default=True,
              help="Keep the teacher's k most likely tokens (0: the whole vocabulary)")
@click.option("--lm-weight", type=float, default=0.0, show_default=True,
              help="Weight of the LM loss on the training text beside the KL")
@click.option("--hidden-weight", type=float, default=0.0, show_default=True,
              help="Weight of the per-layer hidden-state term (relative MSE to the teacher)")
@click.option("--autocast", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True, help="bf16 autocast of the training forwards (auto: CUDA only)")
@click.option("--trainable", type=click.Choice(["weights", "scales"]), default="weights",
              show_default=True,
              help="Quantized layers: weights on their grid (straight-through) or scales only")
@click.option("--heldout", type=int, default=8, show_default=True,
              help="Held-out windows of the calibration text that choose the best step")
@click.option("--eval-every", type=int, default=10, show_default=True,
              help="Steps between held-out evaluations")
@click.option("--patience", type=int, default=0, show_default=True,
              help="Stop after this many evaluations without a gain (0: never)")
@click.option("--warmup", type=int, default=0, show_default=True, help="Linear warm-up steps")
@calibration_options
@_errors
def distill(student: str, teacher: str, steps: int, lr: float, train_batch: int,
            temperature: float, topk: int, lm_weight: float, hidden_weight: float,
            autocast: str, trainable: str, heldout: int, eval_every: int, patience: int,
            warmup: int, **opts: Any) -> None:
    """Distill STUDENT (an llmc output: quantized and/or pruned) from TEACHER, its uncompressed
    original, and write it to -o in the student's own format (or --format). Pruned zeros stay
    zero, quantized weights stay on their grid."""
    from llmc import api
    from llmc.calibration import load_rows
    from llmc.formats.checkpoint import is_llmc_checkpoint, quant_method
    from llmc.models import load_config, load_model
    from llmc.recipe import Recipe
    from llmc.registry import FORMATS

    _setup_logging(opts["quiet"])
    src, out = Path(student), opts["output"]
    if not (src.is_dir() and is_llmc_checkpoint(src)):
        raise ValueError(f"{student} is not an llmc, GPTQ, AWQ or compressed-tensors checkpoint "
                         "directory; compress a model first (llmc quantize / prune / compress)")
    if out.exists() and not opts["overwrite"] and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if out.resolve() == src.resolve():
        raise ValueError("the output must not be the student's directory")
    args = {"steps": steps, "lr": lr, "batch_size": train_batch, "temperature": temperature,
            "topk": topk, "lm_weight": lm_weight, "hidden_weight": hidden_weight,
            "autocast": autocast, "trainable": trainable, "heldout": heldout,
            "eval_every": eval_every, "patience": patience, "warmup": warmup}
    recipe = _with_overrides(Recipe.from_dict({"steps": [{"method": "distill", "args": args}]}),
                             opts)
    t_config, s_config = load_config(teacher, opts["trust_remote_code"]), load_config(str(src))
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(t_config, key, None) != getattr(s_config, key, None):
            raise ValueError(f"the teacher's {key} ({getattr(t_config, key, None)}) differs from "
                             f"the student's ({getattr(s_config, key, None)}); pass the model "
                             "the student was compressed from")
    from llmc.checks import check_model, check_seqlen

    check_model(recipe, s_config)
    check_seqlen(recipe, s_config)
    cal = recipe.calibration
    load_rows(cal.dataset, cal.split, text_column=cal.text_column)  # a missing file fails now
    fmt = opts["fmt"] or (quant_method(src) if quant_method(src) in FORMATS else "gptq")
    model, tok = api.load(src, progress=not opts["quiet"])
    teacher_model, t_tok = load_model(teacher, trust_remote_code=opts["trust_remote_code"])
    model, report = api.distill(model, teacher_model, recipe, tokenizer=tok or t_tok,
                                progress=not opts["quiet"])
    api.save(model, out, tokenizer=tok or t_tok, report=report, overwrite=opts["overwrite"],
             format=fmt, progress=not opts["quiet"])
    d = report.distill[0]
    click.echo(f"distilled {d['steps_run']} steps in {d['seconds']:.1f} s; held-out KL "
               f"{d['heldout_kl_start']:.4f} -> {d['heldout_kl_best']:.4f} (step "
               f"{d['best_step']}); wrote {out}", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def methods(as_json: bool) -> None:
    """List the registered methods and their arguments."""
    from llmc.registry import METHODS

    rows = []
    for name in METHODS.names():
        e = METHODS.get(name)
        rows.append({"name": name, "doc": e.doc,
                     "args": [{"name": a, "default": d, "type": t} for a, d, t in e.arguments()]})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']}: {r['doc']}")
        for a in r["args"]:
            click.echo(f"    {a['name']:<16} {a['type']:<6} default {a['default']!r}")
    walker = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(WalkerConfig))
    click.echo(f"walker settings: {walker}")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main() -> None:
    try:
        cli()
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # a torchrun launch
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
