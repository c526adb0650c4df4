"""What an FP8 KV cache alone costs SmolLM2-135M: the FP model with its keys and values
quantized on static scales from the calibration windows (the benchmark's 128 windows of 512
tokens, seed 0), evaluated on the first 8 test windows of 2048 tokens. Rows: FP; the cache per
tensor and per head; keys only and values only (per tensor); and per tensor with the scales
doubled (room above the calibrated maxima, which some test windows exceed). Writes
``benchmarks/results/kv_cache.json``.

    python benchmarks/kv_cache.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from llmc.calibration import (
    CalibrationConfig,
    calibration_windows,
    joined_text,
    load_rows,
    tokenize_text,
)
from llmc.core.act import KVCacheScheme
from llmc.eval.perplexity import perplexity
from llmc.models import kvcache, load_model

RESULTS = Path(__file__).parent / "results"
WINDOWS = 8


def main() -> None:
    model, tok = load_model("smollm2-135m")
    test = tokenize_text(tok, joined_text(load_rows("wikitext2-raw", "test")))
    calib = calibration_windows(tok, CalibrationConfig(samples=128, seqlen=512, seed=0))

    def ppl() -> float:
        return perplexity(model, test, seqlen=2048, windows=WINDOWS)["perplexity"]

    rows = {"fp": {"perplexity": ppl()}}
    fp = rows["fp"]["perplexity"]
    kvcache.enable(model)
    scales = {}
    for strategy in ("tensor", "attn_head"):
        scheme = KVCacheScheme(strategy=strategy)
        mods = kvcache.mark(model, scheme)
        ranges = kvcache.KVRanges()
        with torch.no_grad(), kvcache.observing(ranges):
            for i in range(0, calib.shape[0], 16):
                model(calib[i:i + 16])
        scales[strategy] = {n: ranges.pop_scales(n, scheme) for n in mods}
    variants = {  # name: (strategy, k scale factor or None for unquantized, v factor)
        "kv per tensor": ("tensor", 1.0, 1.0),
        "kv per head": ("attn_head", 1.0, 1.0),
        "keys only": ("tensor", 1.0, None),
        "values only": ("tensor", None, 1.0),
        "kv per tensor, scales x2": ("tensor", 2.0, 2.0),
    }
    for name, (strategy, fk, fv) in variants.items():
        scheme = KVCacheScheme(strategy=strategy)
        for n, m in kvcache.mark(model, scheme).items():
            k, v = scales[strategy][n]
            m.llmc_kv_scales = (k * fk if fk else None, v * fv if fv else None)  # None: as is
        t = time.perf_counter()
        p = ppl()
        rows[name] = {"perplexity": p, "vs_fp_percent": (p / fp - 1) * 100,
                      "eval_seconds": time.perf_counter() - t}
        print(name, rows[name], flush=True)
    out = {"protocol": f"SmolLM2-135M FP, KV cache FP8 E4M3 on static amax/448 scales from 128 "
                       f"calibration windows of 512 tokens (seed 0); first {WINDOWS} test "
                       "windows of 2048 tokens", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kv_cache.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
