"""Choose GPTQ's clipping settings on held-out calibration text, never on the test split.

Each candidate compresses SmolLM2-135M with the benchmark's calibration set (128 windows of 512
tokens of the wikitext-2-v1 validation split, seed 0) and is scored by perplexity on held-out
windows of the same split that overlap no calibration window
(``llmc.calibration.heldout_windows``). Results go to ``benchmarks/results/tune_gptq.json``.

    python benchmarks/tune_gptq.py
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from quant_table import PeakRSS

import llmc
from llmc.calibration import CalibrationConfig, TokenSource, calibration_windows, heldout_windows
from llmc.eval.perplexity import perplexity
from llmc.models import load_model

OUT = Path(__file__).parent / "results" / "tune_gptq.json"

CANDIDATES = {
    "no-clip": {"clip": False},
    "clip-norm2-hdiag (default)": {"clip": True, "clip_norm": 2.0},
    "clip-norm2.4-hdiag": {"clip": True, "clip_norm": 2.4},
}


def heldout_ppl(model, windows: torch.Tensor) -> float:
    """The held-out windows laid end to end and cut back into the same windows."""
    ids = windows.reshape(1, -1)
    return perplexity(model, ids, seqlen=windows.shape[1])["perplexity"]


def main() -> None:
    model, tok = load_model("smollm2-135m")
    src = TokenSource(tok)
    cfg = CalibrationConfig(samples=128, seqlen=512, seed=0)
    calib = calibration_windows(src, cfg)
    held = heldout_windows(src, cfg, 16)
    results = {"protocol": "GPTQ 4-bit group 64 sym static act-order, 128x512 calibration; "
                           "score: perplexity on 16 held-out windows of 512 tokens of the "
                           "wikitext-2-v1 validation split, disjoint from the calibration windows",
               "fp": heldout_ppl(model, held), "candidates": {}}
    print("fp", results["fp"], flush=True)
    for name, args in CANDIDATES.items():
        m = copy.deepcopy(model)
        recipe = {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 64, **args}}]}
        with PeakRSS() as mem:
            t = time.perf_counter()
            m, _ = llmc.compress(m, recipe, calibration=calib, progress=False)
            secs = time.perf_counter() - t
        results["candidates"][name] = {
            "args": args, "heldout_ppl": heldout_ppl(m, held), "compress_seconds": secs,
            "peak_rss_growth_mib": (mem.peak - mem.start) / 2**20,
        }
        print(name, results["candidates"][name], flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2) + "\n")
        del m


if __name__ == "__main__":
    main()
