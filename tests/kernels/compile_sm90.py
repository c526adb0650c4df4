"""Compile one config of every kernel and mode for sm_90 (run as a script, without
``TRITON_INTERPRET``, which turns ``@triton.jit`` into the interpreter). Prints one JSON line:
{"skip": reason} or {"compiled": n, "failed": {name: error}}."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

# the ahead-of-time compiler is a developer tool outside the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


def main() -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore")
    try:
        import triton  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return {"skip": f"Triton cannot compile ahead of time here: {e}"}
    from aot import compile_for

    from llmc.kernels import _sparse24_triton as sp
    from llmc.kernels import _wq_triton as wq

    def build(fn, constexprs, pointers, cfg):
        compile_for(fn, constexprs, pointers, cfg.num_warps, cfg.num_stages)

    def first(configs, gemv):
        return next(c for c in configs if bool(c.kwargs.get("GEMV")) == gemv)

    def args(cfg, drop=("GEMV",)):
        return {k: v for k, v in cfg.kwargs.items() if k not in drop}

    wq_ptrs = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i32",
               "g_ptr": "*i32", "out_ptr": "*fp16"}
    jobs = []
    for groups in (0, 1, 2):
        g = first(wq.DECODE, True)
        jobs.append((f"wq gemv groups={groups}", wq._wq_gemv_kernel,
                     dict(BITS=4, GROUPS=groups, EVEN=False, **args(g)), wq_ptrs, g))
        for t in (first(wq.DECODE, False), wq.PREFILL[0]):
            jobs.append((f"wq tile {t.describe()} groups={groups}", wq._wq_matmul_kernel,
                         dict(BITS=4, GROUPS=groups, MAGIC16=0x6400, **args(t)), wq_ptrs, t))
    for pairs in (True, False):
        t = next(c for c in wq.SWAP if c.kwargs["PAIRS"] == pairs)
        for even in (False, True):
            jobs.append((f"wq swap pairs={pairs} even={even}", wq._wq_swap_kernel,
                         dict(BITS=4, GROUPS=0, MAGIC16=0x6400, ASM=int(pairs), EVEN=even,
                              **args(t, drop=("SWAP", "PAIRS"))), wq_ptrs, t))
    for quant in (False, True):
        ptrs = {"x_ptr": "*fp16", "v_ptr": "*i32" if quant else "*fp16", "qv_ptr": "*i32",
                "meta_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i32", "out_ptr": "*fp16"}
        t = first(sp.DECODE, False)
        jobs.append((f"2:4 tile quant={quant}", sp._sparse24_matmul_kernel,
                     dict(QUANT=quant, **args(t)), ptrs, t))
    t = sp.SWAP[0]
    for even, dt in ((False, "fp16"), (True, "fp16"), (False, "bf16")):
        jobs.append((f"2:4 swap even={even} {dt}", sp._sparse24_swap_kernel,
                     dict(BLOCK_M=16, EVEN=even, **args(t, drop=("SWAP",))),
                     {"x_ptr": f"*{dt}", "v_ptr": "*i32", "meta_ptr": "*u8",
                      "out_ptr": f"*{dt}"}, t))
    t = sp.QSWAP[0]
    for even in (False, True):
        jobs.append((f"2:4+int4 swap even={even}", sp._sparse24q_swap_kernel,
                     dict(BLOCK_M=16, EVEN=even, MAGIC16=0x6400, **args(t, drop=("SWAP",))),
                     {"x_ptr": "*fp16", "qv_ptr": "*i32", "meta_ptr": "*i16", "s_ptr": "*fp16",
                      "z_ptr": "*i32", "out_ptr": "*fp16"}, t))
    g = first(sp.DECODE, True)
    jobs.append(("2:4 gemv", sp._sparse24_gemv_kernel, args(g), {**ptrs, "v_ptr": "*fp16"}, g))
    g = first(sp.QDECODE, True)
    jobs.append(("2:4+int4 gemv", sp._sparse24q_gemv_kernel,
                 dict(BLOCK_N=g.kwargs["BLOCK_N"], BLOCK_W=g.kwargs["BLOCK_G"] // 4,
                      SPLIT_K=g.kwargs["SPLIT_K"], WORD_GROUPS=True), ptrs, g))
    from llmc.kernels import _native_triton as nv
    from llmc.kernels.tune import Config

    nv_cfg = Config({}, num_warps=4, num_stages=2)
    for perm, meta, dt, bm in ((False, False, "fp16", 16), (True, False, "bf16", 16),
                               (False, True, "fp16", 16), (False, False, "fp16", 64),
                               (False, True, "bf16", 64)):
        phase = "decode" if bm <= 16 else "prefill"
        jobs.append((f"native {phase} perm={perm} 2:4={meta} {dt}", nv._native_kernel,
                     dict(GROUP=128, BLOCK_M=bm, TILES=2 if bm <= 16 else 4, PERM=perm,
                          META=meta),
                     {"x_ptr": f"*{dt}", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8",
                      "perm_ptr": "*i32", "m_ptr": "*i32", "out_ptr": f"*{dt}"}, nv_cfg))
    failed = {}
    for name, fn, const, pointers, cfg in jobs:
        try:
            build(fn, const, pointers, cfg)
        except Exception as e:  # report every kernel, not only the first failure
            if "ptxas" in str(e).lower() and "not found" in str(e).lower():
                return {"skip": f"no ptxas: {e}"}
            failed[name] = f"{type(e).__name__}: {str(e)[:800]}"
    return {"compiled": len(jobs) - len(failed), "failed": failed}


if __name__ == "__main__":
    print(json.dumps(main()))
