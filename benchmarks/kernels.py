"""Kernel speed on a GPU: llmc's Triton W4A16 and 2:4 matmuls against fp16 ``torch.matmul``
(cuBLAS), and greedy-decode tokens/s of a randomly initialised 7B-shaped llama, packed vs dense.

    python benchmarks/kernels.py            # on a CUDA machine; under 8 minutes on an H100
    python benchmarks/kernels.py --smoke    # tiny shapes on the CPU interpreter (no timings
                                            # worth reading): checks that the script runs

Matmuls: (K, N) in {4096x4096, 4096x11008, 11008x4096, 8192x28672}, M in {1, 4, 16, 64, 256},
group 128 and 64, timed with ``triton.testing.do_bench`` (median ms); each kernel's output is
checked against its ``*_ref`` first. Decode: llama with hidden 4096, intermediate 11008, 32
layers, 32 heads, vocabulary 32000, fp16, a static KV cache, one decode step captured in a CUDA
graph and replayed for 128 tokens; packed = every block Linear a 4-bit group-128
``QuantLinear`` (random codes). Results: ``benchmarks/results/kernels.json`` and ``.md``, the GPU
named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]
MS = [1, 4, 16, 64, 256]
GROUPS = [128, 64]


def bench(fn, smoke: bool) -> float:
    if smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def random_quant_linear(K: int, N: int, group: int, device):
    import torch

    from llmc.nn import QuantLinear

    ql = QuantLinear(K, N, 4, group, True, dtype=torch.float16, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    ql.qweight.copy_(torch.randint(-2**31, 2**31 - 1, ql.qweight.shape, generator=g,
                                   device=device, dtype=torch.int64).to(torch.int32))
    ql.qzeros.fill_(0x88888888 - 2**32)  # every zero point 8
    ql.scales.copy_(torch.rand(ql.scales.shape, generator=g, device=device) * 0.02)
    return ql


def matmuls(device, smoke: bool) -> list[dict]:
    import torch

    from llmc.kernels.sparse24 import compress_24, sparse24_matmul, sparse24_matmul_ref
    from llmc.kernels.wq_matmul import wq_matmul, wq_matmul_ref
    from llmc.prune.masks import nm_keep

    shapes = [(256, 192)] if smoke else SHAPES
    ms = [1, 16] if smoke else MS
    rows = []
    for K, N in shapes:
        W = torch.randn(N, K, device=device, dtype=torch.float16)
        W24 = W * nm_keep(W.abs(), 2, 4)
        values, meta = compress_24(W24)
        for group in GROUPS:
            ql = random_quant_linear(K, N, group, device)
            args = (ql.qweight, ql.scales, ql.qzeros, ql.g_idx, 4)
            for M in ms:
                x = torch.randn(M, K, device=device, dtype=torch.float16)
                y = wq_matmul(x, *args, group)
                ref = wq_matmul_ref(x, *args)
                err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                row = {"K": K, "N": N, "M": M, "group": group, "w4a16_rel_err": err,
                       "fp16_ms": bench(lambda x=x, W=W: torch.matmul(x, W.t()), smoke),
                       "w4a16_ms": bench(lambda x=x, a=args, g=group: wq_matmul(x, *a, g), smoke)}
                row["w4a16_speedup"] = row["fp16_ms"] / row["w4a16_ms"]
                if group == GROUPS[0]:
                    y = sparse24_matmul(x, values, meta)
                    ref = sparse24_matmul_ref(x, values, meta)
                    row["sparse24_rel_err"] = (
                        (y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    row["sparse24_ms"] = bench(
                        lambda x=x, v=values, m=meta: sparse24_matmul(x, v, m), smoke)
                    row["sparse24_speedup"] = row["fp16_ms"] / row["sparse24_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def llama(device, smoke: bool, packed: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmc.models import block_linears

    cfg = (LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=512)
           if smoke else
           LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000))
    with torch.device("meta" if packed else device):
        model = LlamaForCausalLM(cfg).to(torch.float16)
    if packed:
        # Allocate first (to_empty would also re-allocate the QuantLinears' buffers), then
        # put random packed Linears in place of the block Linears.
        model = model.to_empty(device=device)
        with torch.no_grad():
            for m in model.modules():
                w = getattr(m, "weight", None)
                if isinstance(w, torch.nn.Parameter):
                    w.normal_(0, 0.02) if w.dim() > 1 else w.fill_(1.0)
        with torch.device(device):  # to_empty left the rotary buffers uninitialised
            model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
        for layer in model.model.layers:
            for name, lin in block_linears(layer).items():
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent), child,
                        random_quant_linear(lin.in_features, lin.out_features, 128, device))
    return model.eval()


def decode(device, smoke: bool, packed: bool, tokens: int = 128) -> dict:
    """Greedy decode of ``tokens`` tokens: one step captured in a CUDA graph (eager on CPU)."""
    import torch
    from transformers import StaticCache

    model = llama(device, smoke, packed)
    n = 4 if smoke else tokens
    cache = StaticCache(config=model.config, max_cache_len=n + 2)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)

    def step():
        with torch.no_grad():
            logits = model(input_ids=ids, past_key_values=cache, cache_position=pos,
                           use_cache=True).logits
        ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        pos.add_(1)

    mode = "eager"
    run = step
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up: autotuning, lazy init, cached qparams
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run, mode = graph.replay, "cuda graph"
        cache.reset()
    pos.zero_()
    ids.zero_()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    out = {"packed": packed, "tokens": n, "seconds": secs, "tokens_per_s": n / secs,
           "mode": mode}
    print(json.dumps(out), flush=True)
    return out


def write(results: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Kernels on {results['device']}", "", results["protocol"], "",
             "| K | N | M | group | fp16 ms | W4A16 ms | W4A16 x | 2:4 ms | 2:4 x |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["matmuls"]:
        sp = (f"{r['sparse24_ms']:.4f} | {r['sparse24_speedup']:.2f}" if "sparse24_ms" in r
              else " | ")
        lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['group']} | {r['fp16_ms']:.4f} | "
                     f"{r['w4a16_ms']:.4f} | {r['w4a16_speedup']:.2f} | {sp} |")
    d = results["decode"]
    if d:
        dense, packed = d
        lines += ["", "| decode (7B-shaped llama, fp16) | tokens/s | mode |", "|---|---|---|",
                  f"| dense | {dense['tokens_per_s']:.1f} | {dense['mode']} |",
                  f"| packed W4 g128 | {packed['tokens_per_s']:.1f} | {packed['mode']} |",
                  f"| ratio | {packed['tokens_per_s'] / dense['tokens_per_s']:.2f}x | |"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="Tiny shapes on the CPU interpreter")
    ap.add_argument("--no-decode", action="store_true", help="Matmuls only")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or --smoke to check the script on CPU")
    device = torch.device("cpu" if args.smoke else "cuda")
    name = "kernels_smoke" if args.smoke else "kernels"
    results = {
        "device": "CPU (Triton interpreter, smoke run)" if args.smoke
        else torch.cuda.get_device_name(0),
        "torch": torch.__version__, "platform": platform.platform(),
        "protocol": __doc__.split("\n\n")[2].replace("\n", " "),
        "matmuls": matmuls(device, args.smoke), "decode": [],
    }
    write(results, name)
    if not args.no_decode:
        results["decode"] = [decode(device, args.smoke, packed=False)]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["decode"].append(decode(device, args.smoke, packed=True))
        write(results, name)


if __name__ == "__main__":
    main()
