"""Run by ``torchrun`` from ``test_distributed.py``: compress a tiny model with each recipe
named on the command line, resident or streamed, and save the tensors (rank 0).

    python -m torch.distributed.run --nproc-per-node N dist_worker.py OUT SRC MODE [--exact]
        [--die-at BLOCK] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest's helpers

RECIPES = {
    "rtn": {"steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 32}}]},  # rank 0 alone
    "gptq": {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 32}}]},
    "sparsegpt24": {"steps": [{"method": "sparsegpt", "args": {"sparsity": 0.5,
                                                               "pattern": "2:4"}}]},
    "sparsegpt24+gptq": {"steps": [{"method": "sparsegpt", "args": {"sparsity": 0.5,
                                                                    "pattern": "2:4"}},
                                   {"method": "gptq", "args": {"bits": 4, "group_size": 32}}]},
    "wanda": {"steps": [{"method": "wanda", "args": {"sparsity": 0.5}}]},
    "wanda-owl": {"steps": [{"method": "wanda", "args": {"sparsity": 0.5, "owl": True}}]},
    "gptq-w8a8-static": {"steps": [{"method": "gptq", "args": {
        "bits": 8, "group_size": -1, "act_bits": 8, "act_strategy": "tensor",
        "act_dynamic": False}}]},
    "awq+gptq": {"steps": [{"method": "awq", "args": {"bits": 4, "group_size": 32,
                                                      "search_samples": 5}},
                           {"method": "gptq", "args": {"bits": 4, "group_size": 32}}]},
    "smoothquant+gptq-w8a8": {"steps": [{"method": "smoothquant"},
                                        {"method": "gptq", "args": {"bits": 8, "group_size": -1,
                                                                    "act_bits": 8}}]},
    # learned rounding: every step's chunk on one rank (token sampling), the held-out chunks
    # on another; with GPTQ's start, its Hessians summed and its solves split
    "signround": {"steps": [{"method": "signround", "args": {
        "bits": 4, "group_size": 32, "iters": 8, "tokens": 0.5, "heldout": 4,
        "eval_every": 4}}]},
    "signround-gptq": {"steps": [{"method": "signround", "args": {
        "bits": 3, "group_size": 32, "iters": 6, "init": "gptq", "heldout": 4,
        "eval_every": 3}}]},
    # block-wise distillation after GPTQ: AdamW on the gradient of the step's chunk's rank
    "gptq+distill": {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 32}},
                               {"method": "distill", "args": {
                                   "mode": "block", "steps": 4, "lr": 1e-3, "heldout": 4,
                                   "eval_every": 2}}]},
    "gptq+kv": {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 32}}],
                "kv_cache": {"strategy": "tensor"}},
    # an MoE model: experts with fewer than 100 tokens over all ranks' windows fall back to RTN
    # (every rank alone sees fewer than that for every expert)
    "gptq-moe": {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 16}}],
                 "walker": {"min_expert_tokens": 100}},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("src")
    p.add_argument("recipes")
    p.add_argument("--exact", action="store_true")
    p.add_argument("--die-at", type=int, default=-1)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    from conftest import calib_ids

    import llmc
    from llmc.engine import walker

    if a.die_at >= 0 and int(os.environ.get("RANK", "0")) == 1:
        original = walker.Engine._finish_block

        def finish(self, b, block, t0):
            if b == a.die_at:
                os._exit(3)  # a rank dies mid-run: no cleanup, no message
            original(self, b, block, t0)

        walker.Engine._finish_block = finish
    out = Path(a.out)
    for name in a.recipes.split(","):
        recipe = {**RECIPES[name], "walker": {"batch_size": 2, "dtype": "float32",
                                              **RECIPES[name].get("walker", {})}}
        _, report = llmc.compress(a.src, recipe, calibration=calib_ids(12, 24),
                                  out=out / name, progress=False, exact_stats=a.exact,
                                  resume=a.resume)
        if int(os.environ.get("RANK", "0")) == 0:
            (out / f"{name}.engine.json").write_text(json.dumps(report.engine, default=str))
            (out / f"{name}.experts.json").write_text(json.dumps(report.experts))


if __name__ == "__main__":
    main()
