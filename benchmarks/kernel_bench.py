"""Kernel speed on a GPU: llmc's Triton W4A16, 2:4 and 2:4 + INT4 matmuls against fp16
``torch.matmul`` (cuBLAS), and greedy-decode tokens/s of a randomly initialised 7B-shaped
llama, packed vs dense.

    python benchmarks/kernel_bench.py            # on a CUDA machine; about 5 minutes on an H200
    python benchmarks/kernel_bench.py --smoke    # tiny shapes on the CPU interpreter (no timings
                                            # worth reading): checks that the script runs

Matmuls: (K, N) in {4096x11008, 8192x28672, 4096x4096, 11008x4096}, M in {1, 4, 16, 64, 256},
group 128 and 64. Times are GPU time per call as a CUDA-graph replay sees it, with a cold L2
(``llmc.kernels.tune.gpu_time_ms``: median of 5 replays of 20 calls, each after a 256 MB read
whose own time is subtracted), so that host launch overhead does not swamp kernels of a few
microseconds; the W4A16 rows also give eager ``triton.testing.do_bench`` time (host overhead
included). Each kernel's output is checked against its ``*_ref`` first. The launch config of
each kernel is the fastest of its short fixed list (``llmc.kernels.tune``, timed once per
shape; the picks are in the JSON). 2:4 rows: random 2:4 fp16 weights (Triton kernel, and
``torch.sparse`` semi-structured where it runs) and the joint 2:4 + INT4 group-128 form.
Native rows: the W4A16 row's codes in the kernel-native layout (``llmc.kernels.native``: the
decode kernel up to M = 16, prefill up to 256, dequantize and cuBLAS above) and a random 2:4 +
INT4 weight in it, group 128.
Decode: llama with hidden 4096, intermediate 11008, 32 layers, 32 heads, vocabulary 32000,
fp16, a static KV cache, one decode step captured in a CUDA graph and replayed for 128 tokens;
every block Linear dense, a 4-bit group-128 ``QuantLinear`` (``native-w4g128``: the same,
running on the kernel-native layout with q/k/v and gate/up fused), a 2:4 ``SparseLinear``
or a 2:4 + INT4 ``SparseQuantLinear`` (random codes), or a stand-in that launches nothing
(``no-matmul``: the step's cost besides its block matmuls, so dense / no-matmul bounds any
format's gain).
Each decode row runs eager (one step in a CUDA graph) and again compiled (``torch.compile``
around the forward, then the same graph), by default.
Results: ``kernels.json`` and ``.md`` in ``--out``
(default ``benchmarks/results``), the GPU named, rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from functools import partial
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SHAPES = [(4096, 11008), (8192, 28672), (4096, 4096), (11008, 4096)]  # the targets' first
MS = [1, 16, 4, 64, 256]
GROUPS = [128, 64]
DECODE_KINDS = ["dense", "w4g128", "native-w4g128", "no-matmul", "2:4", "2:4+w4g128"]


def bench(fn, smoke: bool) -> float:
    if smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from llmc.kernels.tune import gpu_time_ms

    return gpu_time_ms(fn)


def bench_host(fn, smoke: bool) -> float:
    """Eager time, host launch overhead included (``triton.testing.do_bench``)."""
    if smoke:
        return bench(fn, smoke)
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _rand_int32(shape, g, device):
    import torch

    return torch.randint(-2**31, 2**31 - 1, shape, generator=g, device=device,
                         dtype=torch.int64).to(torch.int32)


def no_matmul(K: int, N: int):
    """A stand-in for a block Linear that launches nothing: it returns a zero output of the
    right shape (one per input shape, made on first use). A model of these measures what a
    decode step costs besides its block matmuls, the floor under any weight format's speed-up."""
    import torch

    class NoMatmul(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = K, N
            self.outs = {}

        def forward(self, x):
            key = tuple(x.shape[:-1])
            if key not in self.outs:
                self.outs[key] = torch.zeros(*key, N, dtype=x.dtype, device=x.device)
            return self.outs[key]

    return NoMatmul()


def random_module(kind: str, K: int, N: int, device, group: int = 128, seed: int = 0):
    """A random packed module of ``kind`` (w4 / 2:4 / 2:4+w4; ``native-w4...``: the w4
    QuantLinear, which :func:`llama` then puts in the kernel-native layout) with fp16
    scales/values."""
    import torch

    from llmc.nn import QuantLinear, SparseLinear, SparseQuantLinear

    kind = kind.removeprefix("native-")
    g = torch.Generator(device=device).manual_seed(seed)
    if kind.startswith("w4"):
        m = QuantLinear(K, N, 4, group, True, dtype=torch.float16, device=device)
        m.qweight.copy_(_rand_int32(m.qweight.shape, g, device))
    elif kind == "2:4":
        m = SparseLinear(K, N, dtype=torch.float16, device=device)
        m.values.copy_(torch.randn(m.values.shape, generator=g, device=device) * 0.02)
    else:
        m = SparseQuantLinear(K, N, group, True, dtype=torch.float16, device=device)
        m.qvalues.copy_(_rand_int32(m.qvalues.shape, g, device))
    if hasattr(m, "meta"):
        # random positions, distinct within each pair (0,1 / 0,2 / ... as 2:4 stores them)
        pairs = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], device=device)
        pos = pairs[torch.randint(0, 6, (N, K // 4), generator=g, device=device)]
        from llmc.kernels.sparse24 import _pack_meta

        meta = _pack_meta(pos)
        m.meta.copy_(meta if m.meta.shape == meta.shape else meta.t())
    if hasattr(m, "qzeros"):
        m.qzeros.fill_(0x88888888 - 2**32)  # every zero point 8
        m.scales.copy_(torch.rand(m.scales.shape, generator=g, device=device) * 0.02)
    return m


def native_24(K: int, N: int, group: int, device, seed: int = 0):
    """A random 2:4 + INT4 weight (asymmetric, groups of ``group``) in the native layout."""
    import torch

    from llmc.core.masks import nm_keep
    from llmc.core.scheme import QuantScheme, rtn_codes
    from llmc.kernels.native import repack_native_24

    g = torch.Generator(device=device).manual_seed(seed)
    W = torch.randn(N, K, generator=g, device=device)
    W = W * nm_keep(W, 2, 4)
    qw = rtn_codes(W, QuantScheme(bits=4, group_size=group, sym=False))
    return repack_native_24(qw.q, W, qw.scales, qw.zeros, qw.g_idx, group)


def matmul_row(K: int, N: int, M: int, group: int, device, smoke: bool) -> dict:
    import torch

    from llmc.kernels.native import from_quant_linear, native_matmul, native_matmul_ref
    from llmc.kernels.sparse24 import (
        sparse24_matmul,
        sparse24_matmul_ref,
        sparse24_quant_matmul,
        sparse24_quant_matmul_ref,
    )
    from llmc.kernels.tune import rel_err
    from llmc.kernels.wq_matmul import wq_matmul, wq_matmul_ref

    g = torch.Generator(device=device).manual_seed(M)
    x = torch.randn(M, K, generator=g, device=device, dtype=torch.float16)
    W = torch.randn(N, K, generator=g, device=device, dtype=torch.float16)
    row = {"K": K, "N": N, "M": M, "group": group,
           "fp16_ms": bench(lambda: torch.matmul(x, W.t()), smoke)}
    ql = random_module("w4", K, N, device, group)
    args = (ql.qweight, ql.scales, ql.qzeros, ql.g_idx, 4)
    row["w4a16_rel_err"] = rel_err(wq_matmul(x, *args, group), wq_matmul_ref(x, *args))
    row["w4a16_ms"] = bench(lambda: wq_matmul(x, *args, group), smoke)
    row["w4a16_speedup"] = row["fp16_ms"] / row["w4a16_ms"]
    row["fp16_eager_ms"] = bench_host(lambda: torch.matmul(x, W.t()), smoke)
    row["w4a16_eager_ms"] = bench_host(lambda: wq_matmul(x, *args, group), smoke)
    # the same codes in the kernel-native layout (decode kernel up to 16 rows, prefill to 256)
    nw = from_quant_linear(ql).to(device)
    row["native_rel_err"] = rel_err(native_matmul(x, nw), native_matmul_ref(x, nw))
    row["native_ms"] = bench(lambda: native_matmul(x, nw), smoke)
    row["native_speedup"] = row["fp16_ms"] / row["native_ms"]
    if group != GROUPS[0]:
        return row
    n24 = native_24(K, N, group, device, seed=M)
    row["native24w4_rel_err"] = rel_err(native_matmul(x, n24), native_matmul_ref(x, n24))
    row["native24w4_ms"] = bench(lambda: native_matmul(x, n24), smoke)
    row["native24w4_speedup"] = row["fp16_ms"] / row["native24w4_ms"]
    sl = random_module("2:4", K, N, device)
    v, meta = sl.values, sl.meta
    row["sparse24_rel_err"] = rel_err(sparse24_matmul(x, v, meta),
                                      sparse24_matmul_ref(x, v, meta))
    row["sparse24_ms"] = bench(lambda: sparse24_matmul(x, v, meta), smoke)
    row["sparse24_speedup"] = row["fp16_ms"] / row["sparse24_ms"]
    if device.type == "cuda":
        try:  # the tensor-core path SparseLinear hands large M to
            from torch.sparse import to_sparse_semi_structured

            semi = to_sparse_semi_structured(sl.dense_weight())
            ref = sparse24_matmul_ref(x, v, meta)
            row["semi_rel_err"] = rel_err(torch.nn.functional.linear(x, semi), ref)
            row["semi_ms"] = bench(lambda: torch.nn.functional.linear(x, semi), smoke)
            row["semi_speedup"] = row["fp16_ms"] / row["semi_ms"]
        except Exception as e:
            row["semi_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    sq = random_module("2:4+w4", K, N, device, group)
    qa = (sq.qvalues, sq.meta, sq.scales, sq.qzeros, group)
    row["sparse24w4_rel_err"] = rel_err(sparse24_quant_matmul(x, *qa),
                                        sparse24_quant_matmul_ref(x, *qa))
    row["sparse24w4_ms"] = bench(lambda: sparse24_quant_matmul(x, *qa), smoke)
    row["sparse24w4_speedup"] = row["fp16_ms"] / row["sparse24w4_ms"]
    return row


def matmuls(device, smoke: bool, budget_s: float, results: dict, save, shapes, ms,
            groups) -> None:
    t0 = time.perf_counter()
    shapes = [(256, 192)] if smoke else shapes
    ms = [1, 16] if smoke else ms
    for K, N in shapes:
        for group in groups:
            for M in ms:
                if time.perf_counter() - t0 > budget_s:
                    results["skipped"].append(f"matmul K={K} N={N} M={M} g={group}: budget")
                    continue
                try:
                    row = matmul_row(K, N, M, group, device, smoke)
                except Exception as e:
                    row = {"K": K, "N": N, "M": M, "group": group,
                           "error": f"{type(e).__name__}: {e}"[:400]}
                    traceback.print_exc()
                results["matmuls"].append(row)
                print(json.dumps(row), flush=True)
                save()


def _errors(cfgs, run, ref) -> dict:
    """The relative max error of ``run(config)`` against ``ref`` for each config, or its
    failure as text."""
    from llmc.kernels.tune import rel_err

    out = {}
    for c in cfgs:
        try:
            out[c.describe()] = rel_err(run(c), ref)
        except Exception as e:
            out[c.describe()] = f"{type(e).__name__}: {str(e)[:160]}"
    return out


def gpu_checks(device) -> list[dict]:
    """Every config of the tuner's lists against the ``*_ref`` path on small shapes compiled for
    the GPU: M = 1 on whole tiles and on odd ones (the GEMV's two load paths), the tile configs
    in bf16 (their 16-bit float codes; the interpreter cannot run a bf16 dot), the
    swapped-operand configs (their PTX byte pairs, on whole and on odd tiles), and the 2:4
    and 2:4 + INT4 configs. Relative max error per config, or the failure."""
    import torch

    from llmc.core.masks import nm_keep
    from llmc.core.scheme import QuantScheme
    from llmc.kernels import _sparse24_triton as sp
    from llmc.kernels import _wq_triton as wq
    from llmc.kernels.sparse24 import (
        compress_24,
        sparse24_matmul_ref,
        sparse24_quant_matmul_ref,
    )
    from llmc.kernels.wq_matmul import wq_matmul_ref
    from llmc.methods.rtn import rtn_quantize
    from llmc.nn import QuantLinear

    rows = []
    g = torch.Generator().manual_seed(0)
    for M, K, N, gs, dtype, cfgs in [(1, 512, 256, 128, torch.float16, wq.GEMV1 + wq.SWAP),
                                     (1, 520, 72, 64, torch.float16, wq.GEMV1 + wq.SWAP),
                                     (5, 520, 72, 128, torch.bfloat16, wq.TILES + wq.SWAP),
                                     (16, 256, 256, 128, torch.bfloat16, wq.TILES + wq.SWAP),
                                     (16, 1024, 512, 128, torch.float16, wq.SWAP),
                                     (11, 392, 200, 64, torch.float16, wq.SWAP)]:
        qw = rtn_quantize(torch.randn(N, K, generator=g), QuantScheme(4, gs, False))
        ql = QuantLinear.from_quantized(qw, dtype=dtype).to(device)
        x = torch.randn(M, K, generator=g).to(dtype).to(device)
        a = (ql.qweight, ql.scales, ql.qzeros, ql.g_idx, 4)
        ref = wq_matmul_ref(x, *a)
        errs = _errors(cfgs, partial(wq.launch, x, *a, gs), ref)
        rows.append({"kernel": "w", "case": [M, K, N, gs, str(dtype)], "errors": errs})
    for M, K, N, dtype in [(3, 192, 40, torch.float16), (12, 192, 40, torch.float16),
                           (1, 512, 256, torch.float16), (16, 512, 256, torch.float16),
                           (5, 512, 256, torch.bfloat16)]:
        W = torch.randn(N, K, generator=g)
        v, meta = compress_24((W * nm_keep(W.abs(), 2, 4)).to(dtype))
        v, meta = v.to(device), meta.to(device)
        x = torch.randn(M, K, generator=g).to(dtype).to(device)
        ref = sparse24_matmul_ref(x, v, meta)
        errs = _errors(sp.configs(M), partial(sp.launch, x, v, meta), ref)
        rows.append({"kernel": "2:4", "case": [M, K, N, str(dtype)], "errors": errs})
    for M, K, N in [(1, 512, 256), (16, 512, 256), (5, 384, 136)]:
        m = random_module("2:4+w4g128", K, N, device, seed=M)
        x = torch.randn(M, K, generator=g).half().to(device)
        ref = sparse24_quant_matmul_ref(x, m.qvalues, m.meta, m.scales, m.qzeros, 128)
        run = partial(sp.launch, x, m.qvalues, m.meta, quant=(m.scales, m.qzeros, 128))
        rows.append({"kernel": "2:4+w4", "case": [M, K, N],
                     "errors": _errors(sp.configs(M, quant=True), run, ref)})
    return rows


def llama(device, smoke: bool, kind: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmc.models import block_linears

    cfg = (LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=512)
           if smoke else
           LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.float16)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.nn.Parameter):
                w.normal_(0, 0.02) if w.dim() > 1 else w.fill_(1.0)
    with torch.device(device):  # to_empty left the rotary buffers uninitialised
        model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    if kind != "dense":
        for i, layer in enumerate(model.model.layers):
            for j, (name, lin) in enumerate(block_linears(layer).items()):
                parent, _, child = name.rpartition(".")
                new = (no_matmul(lin.in_features, lin.out_features)
                       if kind == "no-matmul" else
                       random_module(kind, lin.in_features, lin.out_features, device,
                                     seed=i * 16 + j))
                setattr(layer.get_submodule(parent), child, new)
    if kind.startswith("native-"):  # q/k/v and gate/up as one matmul each, the rest alone
        from llmc.api import fuse_siblings
        from llmc.nn import use_native_layout

        fuse_siblings(model)
        use_native_layout(model)
    return model.eval()


def decode(device, smoke: bool, kind: str, tokens: int = 128, compiled: bool = False) -> dict:
    """Greedy decode of ``tokens`` tokens: one step captured in a CUDA graph (eager on CPU, or
    where capture fails: the row says so). ``compiled``: the model's forward through
    ``torch.compile`` first (inductor fuses the norms, rotary and residual glue; each llmc
    module stays one custom op)."""
    import torch
    from transformers import StaticCache

    model = llama(device, smoke, kind)
    if compiled:
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, dynamic=False)
    n = 4 if smoke else tokens
    cache = StaticCache(config=model.config, max_cache_len=n + 8)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)

    def step():
        with torch.no_grad():
            logits = model(input_ids=ids, past_key_values=cache, cache_position=pos,
                           use_cache=True).logits
        ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        pos.add_(1)

    out = {"kind": kind, "mode": "eager", "compiled": compiled}
    run = step
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up: kernel tuning, lazy init, cached checks
                step()
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run, out["mode"] = graph.replay, "cuda graph"
            if compiled:
                out["mode"] = "torch.compile + cuda graph"
        except Exception as e:
            out["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            torch.cuda.synchronize()
        cache.reset()
    pos.zero_()
    ids.zero_()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif compiled:
        out["mode"] = "torch.compile"
        run()  # compile outside the timing (twice: the empty cache, then the filled one)
        run()
        cache.reset()
        pos.zero_()
        ids.zero_()
    t = time.perf_counter()
    for _ in range(n):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    weights = sum(b.numel() * b.element_size() for b in
                  list(model.model.layers.parameters()) + list(model.model.layers.buffers()))
    out.update(tokens=n, seconds=secs, tokens_per_s=n / secs, block_weight_gb=weights / 1e9)
    return out


def write(results: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")

    def cell(r, key):
        if f"{key}_ms" not in r:
            return " | "
        return f"{r[f'{key}_ms'] * 1e3:.1f} | {r[f'{key}_speedup']:.2f}"

    lines = [f"# Kernels on {results['device']}", "", results["protocol"], "",
             "| K | N | M | group | fp16 µs | W4A16 µs | W4A16 x | native µs | native x | "
             "2:4 µs | 2:4 x | 2:4+W4 µs | 2:4+W4 x | native 2:4+W4 µs | native 2:4+W4 x | "
             "semi-structured µs | semi x | eager fp16 / W4A16 µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["matmuls"]:
        if "error" in r:
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['group']} | error: "
                         f"{r['error'][:80]} |")
            continue
        eager = (f"{r['fp16_eager_ms'] * 1e3:.1f} / {r['w4a16_eager_ms'] * 1e3:.1f}"
                 if "w4a16_eager_ms" in r else "")
        lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['group']} | "
                     f"{r['fp16_ms'] * 1e3:.1f} | {cell(r, 'w4a16')} | {cell(r, 'native')} | "
                     f"{cell(r, 'sparse24')} | {cell(r, 'sparse24w4')} | "
                     f"{cell(r, 'native24w4')} | {cell(r, 'semi')} | {eager} |")
    d = [r for r in results["decode"] if "tokens_per_s" in r]
    if d:
        lines += ["", "| decode (7B-shaped llama, fp16) | block weights GB | tokens/s | x dense "
                  "(same mode) | mode |", "|---|---|---|---|---|"]
        for r in d:
            dense = next((q for q in d if q["kind"] == "dense"
                          and q.get("compiled") == r.get("compiled")), None)
            ratio = f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}" if dense else ""
            lines.append(f"| {r['kind']} | {r['block_weight_gb']:.2f} | "
                         f"{r['tokens_per_s']:.1f} | {ratio} | {r['mode']} |")
    for r in results["decode"]:
        if "error" in r or "graph_error" in r:
            lines.append(f"\n{r['kind']}: {r.get('error') or r.get('graph_error')}")
    if results["skipped"]:
        lines += ["", "Skipped (time budget): " + "; ".join(results["skipped"])]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="Tiny shapes on the CPU interpreter")
    ap.add_argument("--no-decode", action="store_true", help="Matmuls only")
    ap.add_argument("--out", type=Path, default=RESULTS, help="Folder for kernels.{json,md}")
    ap.add_argument("--budget", type=float, default=300,
                    help="Seconds of matmul rows after which the rest are skipped (the decode "
                         "rows still run)")
    ap.add_argument("--shapes", nargs="*", default=[f"{k}x{n}" for k, n in SHAPES],
                    help="KxN matmul shapes (default: all four)")
    ap.add_argument("--ms", nargs="*", type=int, default=MS, help="Rows of x (default: all)")
    ap.add_argument("--groups", nargs="*", type=int, default=GROUPS,
                    help="Group sizes (2:4 rows come with the first)")
    ap.add_argument("--decode", nargs="*", default=DECODE_KINDS, choices=DECODE_KINDS,
                    help="Decode rows to run (default: all four)")
    ap.add_argument("--compile", nargs="*", default=None, choices=DECODE_KINDS,
                    help="Decode rows to run again with torch.compile around the model's "
                         "forward (default: every --decode row on a GPU, none in a smoke run; "
                         "compiling takes a minute or more each; --compile alone: none)")
    ap.add_argument("--checks", action="store_true",
                    help="Also run every tuner config against *_ref on small odd shapes")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from llmc.kernels import tune

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or --smoke to check the script on CPU")
    device = torch.device("cpu" if args.smoke else "cuda")
    name = "kernels_smoke" if args.smoke else "kernels"
    import triton

    results = {
        "device": "CPU (Triton interpreter, smoke run)" if args.smoke
        else torch.cuda.get_device_name(0),
        "torch": torch.__version__, "triton": triton.__version__,
        "platform": platform.platform(),
        "protocol": __doc__.split("\n\n")[2].replace("\n", " "),
        "matmuls": [], "decode": [], "skipped": [], "tuned": {},
    }
    t0 = time.perf_counter()

    def save():
        results["tuned"] = tune.choices()
        results["seconds"] = time.perf_counter() - t0
        write(results, args.out, name)

    if args.checks and device.type == "cuda":
        try:
            results["checks"] = gpu_checks(device)
        except Exception as e:
            results["checks"] = [{"error": f"{type(e).__name__}: {e}"[:400]}]
            traceback.print_exc()
        print(json.dumps(results["checks"]), flush=True)
        save()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    if args.compile is None:
        args.compile = [] if args.smoke else args.decode
    matmuls(device, args.smoke, args.budget, results, save, shapes, args.ms, args.groups)
    if not args.no_decode:
        for kind, compiled in ([(k, False) for k in args.decode]
                               + [(k, True) for k in args.compile]):
            try:
                row = decode(device, args.smoke, kind, compiled=compiled)
            except Exception as e:
                row = {"kind": kind, "compiled": compiled,
                       "error": f"{type(e).__name__}: {e}"[:400]}
                traceback.print_exc()
            results["decode"].append(row)
            print(json.dumps(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
    save()


if __name__ == "__main__":
    main()
