"""Measure and write ``benchmarks/baselines/smollm2_ci.json``, the baseline of the CI
perplexity regression (``tests/test_smollm2.py``): FP, RTN, GPTQ and AWQ (4-bit, group 64),
and magnitude, Wanda and SparseGPT (50% unstructured) on SmolLM2-135M, 16 calibration windows of
512 tokens, the first 4 windows of 2048 tokens of the raw Wikitext-2 test split. Rerun it only
when a change is meant to move the numbers, and only for the rows it moves.

    python benchmarks/make_ci_baseline.py                 # every row
    python benchmarks/make_ci_baseline.py wanda sparsegpt # these rows; the others are kept
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

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

OUT = Path(__file__).parent / "baselines" / "smollm2_ci.json"

BASELINE = {
    "model": "smollm2-135m",
    "calibration": {"dataset": "wikitext2", "samples": 16, "seqlen": 512, "seed": 0},
    "evaluation": {"dataset": "wikitext2-raw", "split": "test", "seqlen": 2048, "windows": 4},
    "recipes": {
        "rtn": {"steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}]},
        "gptq": {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 64}}]},
        "awq": {"steps": [{"method": "awq", "args": {"bits": 4, "group_size": 64}}]},
        "magnitude": {"steps": [{"method": "magnitude", "args": {"sparsity": 0.5}}]},
        "wanda": {"steps": [{"method": "wanda", "args": {"sparsity": 0.5}}]},
        "sparsegpt": {"steps": [{"method": "sparsegpt", "args": {"sparsity": 0.5}}]},
    },
    "tolerance": 0.02,
    "tolerance_note": "GPTQ, AWQ, Wanda and SparseGPT may be at most 2% above their baseline "
                      "perplexity (bf16 forwards and BLAS threading move them by well under "
                      "1%).",
}


def main() -> None:
    model, tok = load_model(BASELINE["model"])
    ev = BASELINE["evaluation"]
    ids = tokenize_text(tok, joined_text(load_rows(ev["dataset"], ev["split"])))
    cal = BASELINE["calibration"]
    windows = calibration_windows(tok, CalibrationConfig(**cal))
    out = json.loads(OUT.read_text()) if OUT.exists() else {}
    out.update(BASELINE)
    for key in sys.argv[1:] or ["fp", *BASELINE["recipes"]]:
        m = model
        if key != "fp":
            t = time.perf_counter()
            m, _ = llmc.compress(copy.deepcopy(model), BASELINE["recipes"][key],
                                 calibration=windows, progress=False)
            out[f"{key}_compress_seconds"] = round(time.perf_counter() - t, 1)
        out[key] = perplexity(m, ids, seqlen=ev["seqlen"], windows=ev["windows"])["perplexity"]
        print(key, out[key], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
