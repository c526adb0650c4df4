"""llmc's round-to-nearest against compressed-tensors' (what llm-compressor's RTN runs), on
SmolLM2-135M's block Linears: tensor by tensor, then perplexity for each variant that differs.

Variants, each symmetric W4 in groups of 64 from each group's min/max:
- ``llmc``: llmc's RTN (float32 arithmetic, scales rounded to fp16 before rounding the weights);
- ``ct-fp32``: compressed-tensors' ``calculate_qparams`` and ``fake_quantize`` on the float32
  weights (scales stay float32);
- ``ct-bf16``: the same on the weights cast to bfloat16, as llm-compressor runs on a model
  loaded in bf16 (scale, division and rounding in bf16), the result cast back to float32.

Each variant is evaluated on the protocol's first ``--windows`` test windows of 2048 tokens;
results go to ``benchmarks/results/rtn_grid.json``. Needs ``compressed-tensors`` installed
(``pip install --no-deps compressed-tensors``).

    python benchmarks/rtn_grid.py --variants llmc ct-fp32 ct-bf16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llmc.calibration import joined_text, load_rows, tokenize_text
from llmc.core.scheme import QuantScheme
from llmc.eval.perplexity import perplexity
from llmc.methods.rtn import rtn_compress
from llmc.models import block_linears, load_model

RESULTS = Path(__file__).parent / "results"


def ct_fake_quant(W: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """compressed-tensors' group RTN of ``W`` in its own dtype (min/max per group, as
    llm-compressor's memoryless min-max weight observer)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group",
                            group_size=group)
    N, K = W.shape
    g = W.reshape(N, K // group, group)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    return fake_quantize(W, scale, zp, args)


def variant(model: torch.nn.Module, name: str, bits: int, group: int) -> dict:
    ref = {}
    changed = total = 0
    for layer in model.model.layers:
        for m in block_linears(layer).values():
            W = m.weight.data.float()
            _, llmc_w = rtn_compress(W, QuantScheme(bits, group, True))
            if name == "llmc":
                new = llmc_w
            elif name == "ct-fp32":
                new = ct_fake_quant(W, bits, group).float()
            else:
                new = ct_fake_quant(W.to(torch.bfloat16), bits, group).float()
            changed += int((new != llmc_w).sum())
            total += new.numel()
            m.weight.data = new
    ref["weights_differing_from_llmc"] = changed / total
    return ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="*", default=["llmc", "ct-fp32", "ct-bf16"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=40)
    args = ap.parse_args()
    path = RESULTS / "rtn_grid.json"
    out = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    for name in args.variants:
        model, tok = load_model("smollm2-135m")
        ids = tokenize_text(tok, joined_text(load_rows("wikitext2-raw", "test")))
        t = time.perf_counter()
        row = variant(model, name, args.bits, args.group_size)
        row["quantize_seconds"] = time.perf_counter() - t
        if name == "llmc" or row["weights_differing_from_llmc"] > 0:
            res = perplexity(model, ids, seqlen=2048, windows=args.windows, progress=False)
            row.update(perplexity=res["perplexity"], windows=res["windows"])
        key = f"{name}-w{args.bits}g{args.group_size}"
        out["rows"][key] = row
        out["protocol"] = (f"SmolLM2-135M-Instruct (dequantized Q4_1 GGUF), symmetric min-max "
                           f"RTN; first {args.windows} windows of 2048 tokens of wiki.test.raw")
        out["machine"] = f"torch {torch.__version__}"
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print(key, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
