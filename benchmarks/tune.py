"""Choose a method's settings on held-out calibration text, never on the test split.

Each candidate compresses SmolLM2-135M with the benchmark's calibration set (128 windows of 512
tokens of the wikitext-2-v1 validation split, seed 0) and is scored by perplexity on held-out
windows of the same split that overlap no calibration window
(``llmc.calibration.heldout_windows``). Results go to ``benchmarks/results/tune_<set>.json``.

    python benchmarks/tune.py gptq    # GPTQ's clipping (4-bit, group 64)
    python benchmarks/tune.py awq     # AWQ's scale form and clipping grid (4-bit, group 64)
    python benchmarks/tune.py prune   # the pruners' ranking scope (50% unstructured)
    python benchmarks/tune.py awq3gptq  # AWQ before GPTQ at 3 bits: which AWQ parts help GPTQ
    python benchmarks/tune.py gemma3    # GPTQ 4-bit group 64 on Gemma 3 270M (float32 walker)
    python benchmarks/tune.py smoothquant  # SmoothQuant's alpha before GPTQ W8A8

A set names its model (SmolLM2-135M unless it says otherwise); a candidate is a list of steps
or a whole recipe.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from table import PeakRSS

import llmc
from llmc.calibration import CalibrationConfig, TokenSource, calibration_windows, heldout_windows
from llmc.eval.perplexity import perplexity
from llmc.models import load_model

RESULTS = Path(__file__).parent / "results"


def gptq(**args) -> list[dict]:
    return [{"method": "gptq", "args": {"bits": 4, "group_size": 64, **args}}]


def gptq32(**args) -> dict:
    """GPTQ 4-bit group 64 with the float32 walker."""
    return {"steps": gptq(**args), "walker": {"dtype": "float32"}}


def awq(**args) -> list[dict]:
    return [{"method": "awq", "args": {"bits": 4, "group_size": 64, **args}}]


SETS = {
    "gptq": ("GPTQ 4-bit group 64 sym static act-order", {
        "no-clip": gptq(clip=False),
        "clip-norm2-hdiag (default)": gptq(clip=True, clip_norm=2.0),
        "clip-norm2.4-hdiag": gptq(clip=True, clip_norm=2.4),
    }),
    "awq": ("AWQ 4-bit group 64 sym, then RTN", {
        "rtn (reference)": [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}],
        "duo, 4 search windows, clip grid 100": awq(duo_scaling=True),
        "x_mean only (default)": awq(),
        "duo, clip grid 20 (AutoAWQ's)": awq(duo_scaling=True, clip_grid=20),
        "duo, 8 search windows": awq(duo_scaling=True, search_samples=8),
    }),
    "awq3gptq": ("AWQ then GPTQ, 3-bit group 64 sym", {
        "gptq alone (reference)": [{"method": "gptq", "args": {"bits": 3, "group_size": 64}}],
        "awq + gptq (default: AWQ's clipping off, scales scored with GPTQ)": [
            {"method": "awq", "args": {"bits": 3, "group_size": 64}},
            {"method": "gptq", "args": {"bits": 3, "group_size": 64}}],
        "awq (scales scored with RTN) + gptq": [
            {"method": "awq", "args": {"bits": 3, "group_size": 64, "search": "rtn"}},
            {"method": "gptq", "args": {"bits": 3, "group_size": 64}}],
        "awq (duo scales) + gptq": [
            {"method": "awq", "args": {"bits": 3, "group_size": 64, "duo_scaling": True}},
            {"method": "gptq", "args": {"bits": 3, "group_size": 64}}],
        "awq + gptq (no clip search)": [
            {"method": "awq", "args": {"bits": 3, "group_size": 64}},
            {"method": "gptq", "args": {"bits": 3, "group_size": 64, "clip": False}}],
    }),
    "gemma3": ("Gemma 3 270M: GPTQ 4-bit group 64, float32 walker", {
        "rtn (reference)": [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}],
        "sym (default)": gptq32(),
        "asym": gptq32(sym=False),
        "asym, dynamic act-order": gptq32(sym=False, act_order="dynamic"),
        "asym, damp 0.1": gptq32(sym=False, damp=0.1),
        "sym, damp 0.1": gptq32(damp=0.1),
    }, "gemma3-270m"),
    "smoothquant": ("SmoothQuant, then GPTQ W8A8 INT8 (per channel, per-token activations)", {
        f"alpha {a}": [{"method": "smoothquant", "args": {"alpha": a}},
                       {"method": "gptq", "args": {"bits": 8, "group_size": -1, "act_bits": 8}}]
        for a in (0.5, 0.65, 0.8)
    }),
    "prune": ("Wanda and SparseGPT, 50% unstructured, per row or per layer", {
        "wanda row (default)": [{"method": "wanda", "args": {"sparsity": 0.5}}],
        "wanda layer": [{"method": "wanda", "args": {"sparsity": 0.5, "scope": "layer"}}],
        "sparsegpt layer (default)": [{"method": "sparsegpt", "args": {"sparsity": 0.5}}],
        "sparsegpt row": [{"method": "sparsegpt", "args": {"sparsity": 0.5, "scope": "row"}}],
    }),
}


def heldout_ppl(model, windows: torch.Tensor) -> float:
    """The held-out windows laid end to end and cut back into the same windows."""
    ids = windows.reshape(1, -1)
    return perplexity(model, ids, seqlen=windows.shape[1])["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", choices=list(SETS))
    ap.add_argument("--only", nargs="*", help="Run these candidates only (kept: the others)")
    args = ap.parse_args()
    what, candidates, *rest = SETS[args.set]
    out = RESULTS / f"tune_{args.set}.json"
    model, tok = load_model(rest[0] if rest else "smollm2-135m")
    src = TokenSource(tok)
    cfg = CalibrationConfig(samples=128, seqlen=512, seed=0)
    calib = calibration_windows(src, cfg)
    held = heldout_windows(src, cfg, 16)
    protocol = (f"{what}, 128x512 calibration; score: perplexity on 16 held-out windows of 512 "
                "tokens of the wikitext-2-v1 validation split, disjoint from the calibration "
                "windows")
    results = json.loads(out.read_text()) if out.exists() else {}
    if results.get("protocol") != protocol:
        results = {"protocol": protocol, "candidates": {}}
    results["fp"] = heldout_ppl(model, held)
    print("fp", results["fp"], flush=True)
    for name, recipe in candidates.items():
        if args.only and name not in args.only:
            continue
        m = copy.deepcopy(model)
        with PeakRSS() as mem:
            t = time.perf_counter()
            recipe = recipe if isinstance(recipe, dict) else {"steps": recipe}
            m, _ = llmc.compress(m, recipe, calibration=calib, progress=False)
            secs = time.perf_counter() - t
        results["candidates"][name] = {
            **recipe, "heldout_ppl": heldout_ppl(m, held), "compress_seconds": secs,
            "peak_rss_growth_mib": (mem.peak - mem.start) / 2**20,
        }
        print(name, results["candidates"][name], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        del m


if __name__ == "__main__":
    main()
