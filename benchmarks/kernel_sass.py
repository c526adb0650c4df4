"""What the kernels compile to on a Hopper GPU, without one: each kernel of interest compiled
ahead of time for sm_90 (``tools/aot.py``, Triton's own ``ptxas``), with the integer
arguments of a real 4096 x 11008 launch specialised as the JIT would, then disassembled. For
each: registers, spill stack, and the K loop's instruction mix; the weights (K x N entries) one
thread handles per loop iteration, so instructions per weight; tensor-core, shared-memory and
barrier instructions in the loop (a store to shared memory and a barrier per iteration mark a
weight tile that takes a round trip through shared memory).

    python benchmarks/kernel_sass.py     # CPU only; about a minute

These are static counts, not times: they say where a kernel spends instructions, which matters
because the decode kernels are bound by instructions and latency (``kernel_overhead.json``).
Results: ``kernel_sass.json`` and ``.md`` in ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
K, N, GROUP = 4096, 11008, 128
LOOP_OPS = ["HGMMA", "HMMA", "STS", "LDSM", "LDS", "BAR", "LDG", "LDGSTS"]


def jobs():
    """(name, kernel, constexprs, pointers, config, M, ints, weights per loop iteration)."""
    from llmc.kernels import _sparse24_triton as sp
    from llmc.kernels import _wq_triton as wq

    wq_ptrs = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i32",
               "g_ptr": "*i32", "out_ptr": "*fp16"}

    def wq_ints(M):
        return dict(M=M, N=N, K=K, stride_xm=K, stride_xk=1, stride_qk=N, stride_qn=1,
                    stride_sg=N, stride_sn=1, stride_zg=N // 8, stride_zn=1, stride_om=N,
                    stride_on=1, GROUP_SIZE=GROUP)

    def kw(cfg, *drop):
        return {k: v for k, v in cfg.kwargs.items() if k not in drop}

    out = []
    for name, cfg in [("W4 GEMV, fp32 (the tuner's reference)", wq.GEMV1[0]),
                      ("W4 GEMV, half2 PTX", next(c for c in wq.GEMV1 if c.kwargs["HALF2"]))]:
        c = kw(cfg, "GEMV")
        out.append((name, wq._wq_gemv_kernel,
                    dict(BITS=4, GROUPS=wq._groups(K, 4, GROUP, c["BLOCK_W"]), EVEN=True, **c),
                    wq_ptrs, cfg, 1, wq_ints(1), c["BLOCK_W"] * 8 * c["BLOCK_N"]))
    for cfg, M in [(wq.TILES[0], 16), (wq.TILES[1], 16), (wq.TILES[2], 16),
                   (wq.PREFILL[3], 256)]:
        c = kw(cfg)
        out.append(("W4 tiled", wq._wq_matmul_kernel,
                    dict(BITS=4, GROUPS=wq._groups(K, 4, GROUP, c["BLOCK_W"]), MAGIC16=0x6400,
                         **c), wq_ptrs, cfg, M, wq_ints(M), c["BLOCK_W"] * 8 * c["BLOCK_N"]))
    for cfg, ms, dtype in [(wq.SWAP[0], (16, 1), "fp16"), (wq.SWAP[4], (16,), "fp16"),
                           (wq.SWAP[6], (16,), "fp16"), (wq.SWAP[6], (16,), "bf16"),
                           (wq.PREFILL[5], (256,), "fp16")]:
        c = kw(cfg, "SWAP", "PAIRS")
        pairs = cfg.kwargs["PAIRS"]
        for M in ms:
            out.append((f"W4 swapped operand, {'PTX byte pairs' if pairs else 'code by code'}, "
                        f"{dtype}", wq._wq_swap_kernel,
                        dict(BITS=4, GROUPS=0, MAGIC16=0x6400 if dtype == "fp16" else 0x4300,
                             ASM=int(pairs), EVEN=True, **c),
                        {**wq_ptrs, "x_ptr": f"*{dtype}", "s_ptr": f"*{dtype}",
                         "out_ptr": f"*{dtype}"}, cfg, M, wq_ints(M),
                        c["BLOCK_W"] * 8 * c["BLOCK_N"]))
    sp_ints = dict(N=N, K=K, stride_xm=K, stride_xk=1, stride_om=N, stride_on=1)
    cfg = sp.GEMVS[0]
    out.append(("2:4 GEMV", sp._sparse24_gemv_kernel, kw(cfg, "GEMV"),
                {"x_ptr": "*fp16", "v_ptr": "*fp16", "meta_ptr": "*i32", "out_ptr": "*fp16"},
                cfg, 1, dict(M=1, stride_vn=K // 2, stride_vs=1, stride_mn=K // 32,
                             stride_mk=1, **sp_ints),
                cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_G"] * 4))
    for cfg in sp.TILES[:2]:
        out.append(("2:4 tiled", sp._sparse24_matmul_kernel, dict(QUANT=False, **kw(cfg)),
                    {"x_ptr": "*fp16", "v_ptr": "*fp16", "meta_ptr": "*i32", "s_ptr": "*fp16",
                     "z_ptr": "*i32", "out_ptr": "*fp16"}, cfg, 16,
                    dict(M=16, stride_vs=1, stride_vn=K // 2, stride_mn=K // 32, stride_mk=1,
                         stride_sg=0, stride_sn=0, stride_zg=0, stride_zn=0, GROUP_SIZE=16,
                         **sp_ints),
                    cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_G"] * 4))
    for cfg in (sp.SWAP[0], sp.SWAP[4]):
        out.append(("2:4 swapped operand", sp._sparse24_swap_kernel,
                    dict(BLOCK_M=16, EVEN=True, **kw(cfg, "SWAP")),
                    {"x_ptr": "*fp16", "v_ptr": "*i32", "meta_ptr": "*u8", "out_ptr": "*fp16"},
                    cfg, 16, dict(M=16, stride_vn=K // 4, stride_vg=1, stride_mn=K // 8,
                                  stride_mk=1, **sp_ints),
                    cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_G"] * 4))
    ints = dict(M=16, stride_qw=N, stride_qn=1, stride_sg=N, stride_sn=1, stride_zg=N // 8,
                stride_zn=1, GROUP_SIZE=GROUP, **sp_ints)
    qptrs = {"x_ptr": "*fp16", "qv_ptr": "*i32", "v_ptr": "*i32", "meta_ptr": "*i32",
             "s_ptr": "*fp16", "z_ptr": "*i32", "out_ptr": "*fp16"}
    cfg = sp.QGEMVS[0]
    out.append(("2:4 + INT4 GEMV", sp._sparse24q_gemv_kernel,
                dict(BLOCK_N=cfg.kwargs["BLOCK_N"], BLOCK_W=cfg.kwargs["BLOCK_G"] // 4,
                     SPLIT_K=cfg.kwargs["SPLIT_K"], WORD_GROUPS=True), qptrs, cfg, 1,
                dict(stride_mk=N, stride_mn=1, **{**ints, "M": 1}),
                cfg.kwargs["BLOCK_G"] * 4 * cfg.kwargs["BLOCK_N"]))
    cfg = sp.TILES[0]
    out.append(("2:4 + INT4 tiled", sp._sparse24_matmul_kernel, dict(QUANT=True, **kw(cfg)),
                qptrs, cfg, 16,
                dict(stride_vs=N, stride_vn=1, stride_mn=1, stride_mk=N,
                     **{k: v for k, v in ints.items() if k not in ("stride_qw", "stride_qn")}),
                cfg.kwargs["BLOCK_G"] * 4 * cfg.kwargs["BLOCK_N"]))
    cfg = sp.QSWAP[0]
    c = kw(cfg, "SWAP")
    out.append(("2:4 + INT4 swapped operand", sp._sparse24q_swap_kernel,
                dict(BLOCK_M=16, EVEN=True, MAGIC16=0x6400, **c), {**qptrs, "meta_ptr": "*i16"},
                cfg, 16, dict(stride_mr=2 * N, stride_mc=1, **ints),
                c["BLOCK_W"] * 16 * c["BLOCK_N"]))
    from llmc.kernels import _native_triton as nv
    from llmc.kernels.tune import Config

    cfg = Config({}, num_warps=4, num_stages=2)
    for M, meta, tiles in ((1, False, 2), (16, False, 2), (16, False, 8), (1, True, 2),
                           (64, False, 4), (64, True, 4)):
        kt = K // (128 if meta else 64)
        phase = "decode" if M <= 16 else "prefill"
        out.append((f"native layout {phase}{', 2:4 + INT4' if meta else ''}, {tiles} tiles",
                    nv._native_kernel,
                    dict(GROUP=GROUP, BLOCK_M=max(M, 16), TILES=tiles, PERM=False, META=meta),
                    {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8",
                     "perm_ptr": "*i32", "m_ptr": "*i32", "out_ptr": "*fp16"}, cfg, M,
                    dict(M=M, N=N, K=K, KT=kt, NP=N, stride_xm=K, stride_om=N),
                    tiles * 16 * (128 if meta else 64)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help="Folder for kernel_sass.{json,md}")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore")
    import triton

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from aot import compile_for, disassemble, main_loop_mix

    rows = []
    for name, fn, const, ptrs, cfg, M, ints, weights in jobs():
        row = {"kernel": name, "config": cfg.describe(), "M": M}
        try:
            sass, res = disassemble(compile_for(fn, const, ptrs, cfg.num_warps, cfg.num_stages,
                                                ints=ints))
        except Exception as e:  # report the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        ops = main_loop_mix(sass)
        loop = sum(ops.values())
        per_thread = weights / (cfg.num_warps * 32)
        row.update(res, loop_instructions=loop, weights_per_thread=per_thread,
                   instructions_per_weight=round(loop / per_thread, 2),
                   **{op: ops.get(op, 0) for op in LOOP_OPS},
                   top=dict(ops.most_common(8)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"target": "sm_90", "triton": triton.__version__, "K": K, "N": N, "group": GROUP,
              "rows": rows}
    (args.out / "kernel_sass.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Kernel instruction counts, sm_90 (Triton {triton.__version__}, ahead of time)",
             "", f"K x N = {K} x {N}, group {GROUP}; counts are per thread, K loop body.", "",
             "| kernel | config | M | regs | loop instr | weights/thread | instr/weight | "
             + " | ".join(LOOP_OPS) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(LOOP_OPS)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['config']} | {r['M']} | {r['error']} |")
            continue
        lines.append(f"| {r['kernel']} | {r['config']} | {r['M']} | {r['regs']} | "
                     f"{r['loop_instructions']} | {r['weights_per_thread']:g} | "
                     f"{r['instructions_per_weight']} | "
                     + " | ".join(str(r[op]) for op in LOOP_OPS) + " |")
    (args.out / "kernel_sass.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
