"""Dense vs magnitude vs Wanda vs SparseGPT on SmolLM2-135M-Instruct, Wikitext-2 perplexity.

50% unstructured (uniform, and with OWL's non-uniform per-block ratios), 2:4 and 4:8, and
SparseGPT 2:4 with 4-bit quantization (in SparseGPT's own pass, and as GPTQ after it in the same
walk); a GPTQ 4-bit row gives the time reference on the same calibration set. The protocol of
``quant_table.py``: one calibration set (128 windows of 512 tokens of the wikitext-2-v1
validation split, seed 0), the first 40 windows of 2048 tokens of the raw test split, each row
in a fresh process; results in ``benchmarks/results/prune_table.json`` and ``.md``.

    python benchmarks/prune_table.py                       # every row
    python benchmarks/prune_table.py --rows fp wanda-50    # some rows
    python benchmarks/prune_table.py --redo sparsegpt-50   # recompute a row
"""

from __future__ import annotations

import table

METHODS = ("magnitude", "wanda", "sparsegpt")
W4G64 = {"bits": 4, "group_size": 64}


def prune(method: str, then: dict | None = None, **args) -> dict:
    steps = [{"method": method, "args": args}]
    if then is not None:
        steps.append(then)
    return {"steps": steps}


# The rows with time targets first, GPTQ being the reference.
ROWS: dict[str, dict | None] = {"fp": None, "gptq-w4g64": {"steps": [{"method": "gptq",
                                                                      "args": W4G64}]}}
for m in ("wanda", "sparsegpt", "magnitude"):
    ROWS[f"{m}-50"] = prune(m, sparsity=0.5)
for m in METHODS:
    ROWS[f"{m}-50-owl"] = prune(m, sparsity=0.5, owl=True)
for pattern in ("2:4", "4:8"):
    for m in METHODS:
        ROWS[f"{m}-{pattern.replace(':', '')}"] = prune(m, pattern=pattern)
ROWS["sparsegpt-24-w4g64-joint"] = prune("sparsegpt", pattern="2:4", **W4G64)
ROWS["sparsegpt-24+gptq-w4g64"] = prune("sparsegpt", {"method": "gptq", "args": W4G64},
                                        pattern="2:4")
# learned rounding after the mask (50 steps per block, full-range grid, float32 forwards on
# the CPU, 4 windows per step)
ROWS["sparsegpt-24+signround-w4g64-fast-full"] = {
    **prune("sparsegpt", {"method": "signround",
                          "args": {**W4G64, "preset": "fast", "full_range": True}},
            pattern="2:4"),
    "walker": {"batch_size": 4, "dtype": "float32"}}


def _describe(r: dict) -> tuple[str, str, str]:
    steps = r["recipe"]["steps"]
    first = steps[0]["args"]
    if steps[0]["method"] == "gptq":
        return "gptq", "", "4-bit g64"
    structure = first.get("pattern") or f"{first['sparsity']:.0%}"
    if first.get("owl"):
        structure += " OWL"
    quant = ""
    if first.get("bits"):
        quant = f"{first['bits']}-bit g{first['group_size']}, joint"
    elif len(steps) > 1:
        q = steps[1]["args"]
        quant = f"{steps[1]['method']} {q['bits']}-bit g{q['group_size']}"
    return steps[0]["method"], structure, quant


COLUMNS: list[table.Column] = [
    ("method", lambda r: _describe(r)[0]),
    ("sparsity", lambda r: _describe(r)[1]),
    ("achieved", lambda r: table.fmt(r.get("sparsity"), ".3f")),
    ("quantization", lambda r: _describe(r)[2]),
]

if __name__ == "__main__":
    table.main(__file__, "Pruning SmolLM2-135M: dense vs magnitude vs Wanda vs SparseGPT, "
               "Wikitext-2 perplexity", ROWS, "prune_table", COLUMNS, __doc__, ratio=True)
