"""W8A8 prefill speed on a GPU: :class:`llmc.nn.W8A8Linear` (per-token activation quantization
by the Triton kernel, then ``torch._scaled_mm`` FP8 or ``torch._int_mm`` INT8 with the scales
applied) against an fp16 ``torch.matmul`` (cuBLAS), at 7B shapes.

    python benchmarks/w8a8_prefill.py           # on a CUDA machine (FP8 needs sm_89 or newer)
    python benchmarks/w8a8_prefill.py --smoke   # tiny shapes on the CPU: checks the script runs

(K, N) in {4096x4096, 4096x11008, 11008x4096}, M in {1024, 2048, 4096}; each time is the median
of ``triton.testing.do_bench`` (CUDA events, warm L2), the whole module forward for W8A8
(quantizing the input included). Each output is first checked against the fake-quantized
reference. Results: ``w8a8_prefill.json`` and ``.md`` in ``--out`` (default
``benchmarks/results``), the GPU named. Targets (issue 17): FP8 at least 1.6x fp16, INT8 at
least 1.4x.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llmc.core.act import ActScheme, fake_quantize_act
from llmc.core.scheme import QuantScheme
from llmc.methods.rtn import rtn_quantize
from llmc.nn import W8A8Linear

RESULTS = Path(__file__).parent / "results"
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
MS = [1024, 2048, 4096]


def timed(fn, smoke: bool) -> float:
    """Milliseconds per call."""
    if smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=200))


def row(K: int, N: int, M: int, device: torch.device, smoke: bool) -> dict:
    g = torch.Generator(device="cpu").manual_seed(K + N + M)
    W = torch.randn(N, K, generator=g) / K**0.5
    x = torch.randn(M, K, generator=g).to(device, torch.float16)
    dense = W.to(device, torch.float16)
    out = {"K": K, "N": N, "M": M, "fp16_ms": timed(lambda: x @ dense.t(), smoke)}
    for kind in ("float", "int"):
        qw = rtn_quantize(W, QuantScheme(8, -1, True, kind))
        m = W8A8Linear.from_quantized(qw).to(device)
        ref = fake_quantize_act(x.float(), ActScheme(kind)) @ qw.dequantize().to(device).t()
        err = float((m(x).float() - ref).abs().max() / ref.abs().max())
        ms = timed(lambda m=m: m(x), smoke)
        name = "fp8" if kind == "float" else "int8"
        out.update({f"{name}_ms": ms, f"{name}_speedup": out["fp16_ms"] / ms,
                    f"{name}_rel_error": err})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="Tiny shapes on the CPU")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.smoke:
        device, shapes, ms = torch.device("cpu"), [(64, 96)], [32]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --smoke)")
        device, shapes, ms = torch.device("cuda"), SHAPES, MS
    rows = [row(K, N, M, device, args.smoke) for K, N in shapes for M in ms]
    name = "w8a8_prefill_smoke" if args.smoke else "w8a8_prefill"
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)"
    result = {"device": gpu, "torch": torch.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# W8A8 prefill vs fp16 matmul ({gpu}, torch {torch.__version__})", "",
             "| K x N | M | fp16 ms | FP8 ms | FP8 speedup | INT8 ms | INT8 speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['fp16_ms']:.3f} | {r['fp8_ms']:.3f} "
                     f"| {r['fp8_speedup']:.2f}x | {r['int8_ms']:.3f} | "
                     f"{r['int8_speedup']:.2f}x |")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
