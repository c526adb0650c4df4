"""What a kernel time from ``llmc.kernels.tune.gpu_time_ms`` holds besides the kernel's own
work: the same protocol on kernels that do (almost) nothing, and a W4A16 GEMV timed with the
GPU's clocks idle and again after two seconds of load.

    python benchmarks/kernel_overhead.py --out benchmarks/results   # on a CUDA machine

Writes ``kernel_overhead.json`` (times in µs, the SM clock read by nvidia-smi around each)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def sm_clock() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # no nvidia-smi: the figure is missing, the rest still runs
        return f"unknown ({type(e).__name__})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    import torch
    import triton
    import triton.language as tl

    from llmc.kernels.tune import gpu_time_ms
    from llmc.kernels.wq_matmul import wq_matmul

    sys.path.insert(0, str(Path(__file__).parent))
    from kernel_bench import random_module

    @triton.jit
    def _noop(x_ptr, n):
        pid = tl.program_id(0)
        if pid < 0:  # never: the launch alone is timed
            tl.store(x_ptr, n)

    dev = torch.device("cuda")
    buf = torch.zeros(1, dtype=torch.int32, device=dev)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "triton": triton.__version__, "rows": []}

    def row(name, fn):
        before = sm_clock()
        us = gpu_time_ms(fn) * 1e3
        res["rows"].append({"what": name, "us": us, "sm_clock_before": before,
                            "sm_clock_after": sm_clock()})
        print(json.dumps(res["rows"][-1]), flush=True)

    row("empty Triton kernel, 1 program", lambda: _noop[(1,)](buf, 1))
    row("empty Triton kernel, 1376 programs", lambda: _noop[(1376,)](buf, 1))
    row("torch.zeros(11008) fp16 (the split-K output memset)",
        lambda: torch.zeros(1, 11008, dtype=torch.float16, device=dev))
    ql = random_module("w4", 4096, 4096, dev)
    x = torch.randn(1, 4096, dtype=torch.float16, device=dev)
    a = (ql.qweight, ql.scales, ql.qzeros, ql.g_idx, 4, 128)
    wq_matmul(x, *a)  # tunes once
    row("W4A16 4096x4096 M=1 (clocks as found)", lambda: wq_matmul(x, *a))
    W = torch.randn(4096, 4096, dtype=torch.float16, device=dev)
    row("fp16 matmul 4096x4096 M=1 (clocks as found)", lambda: x @ W.t())
    A = torch.randn(8192, 8192, dtype=torch.float16, device=dev)
    t = time.perf_counter()
    while time.perf_counter() - t < 2.0:  # load, so that the clocks ramp up
        A @ A
    row("W4A16 4096x4096 M=1 (after 2 s of load)", lambda: wq_matmul(x, *a))
    row("fp16 matmul 4096x4096 M=1 (after 2 s of load)", lambda: x @ W.t())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_overhead.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
