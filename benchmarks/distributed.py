"""GPTQ W4 g64 on SmolLM2-135M-Instruct over 1, 2 and 4 processes (torchrun, gloo, one thread
each): time, perplexity, bytes communicated per block and the share of time spent in
collectives; and the speedup the measured split predicts at 4 and 8 GPUs.

Same protocol as ``quant_table.py`` (128 calibration windows of 512 tokens of the wikitext2
validation split, seed 0; perplexity on the first 40 windows of 2048 tokens of the raw test
split). Each rank loads the model itself; rank 0 evaluates.

    python benchmarks/distributed.py                  # 1, 2 and 4 ranks
    python benchmarks/distributed.py --ranks 1 2      # some
    python benchmarks/distributed.py --windows 8      # a shorter evaluation
    python benchmarks/distributed.py --exact --windows 8   # float64 sums: the quantized
                                                      # weights compared with one rank's

Writes ``benchmarks/results/distributed.{json,md}``. This machine has 2 cores, so 4 ranks
share them and the wall time it shows is bounded by the cores; the projection below is what
the measured split says about ranks that each have a device of their own.

Projection. From the one-rank run: ``solve`` is the time of the per-Linear solves (the
report's layer seconds) and ``rest`` the rest of each block (forwards and Hessian sums, which
the ranks split evenly). At n ranks a group takes the longest of its owners' solves (the owner
assignment llmc uses, on the measured seconds), the rest takes ``rest / n``, and each block's
bytes cross the interconnect at ``--link-gbps`` (default 100 GB/s) with ``--latency-us``
(default 30 us) per collective. These are assumptions about a GPU machine, stated in the
output; the split itself is this CPU's and a GPU's differs (its forwards are relatively faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RECIPE = {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 64}}]}


def worker(args: argparse.Namespace) -> None:
    """One rank (under torchrun): compress, and on rank 0 evaluate and write the row."""
    import torch

    torch.set_num_threads(1)
    import llmc
    from llmc.calibration import CalibrationConfig, joined_text, load_rows, tokenize_text
    from llmc.eval.perplexity import perplexity
    from llmc.models import get_adapter, load_model

    rank = int(os.environ.get("RANK", "0"))
    model, tok = load_model(args.model)
    calib = CalibrationConfig(samples=args.samples, seqlen=args.calib_seqlen, seed=0)
    t = time.perf_counter()
    model, report = llmc.compress(model, RECIPE, tokenizer=tok, calibration=calib,
                                  progress=rank == 0, exact_stats=args.exact)
    secs = time.perf_counter() - t
    if rank != 0:
        return
    if args.exact:  # the quantized weights, to compare across rank counts
        from safetensors.torch import save_file

        blocks = get_adapter(model.config).get_blocks(model)
        save_file({f"{b}.{n}": m.weight.data.contiguous() for b, blk in enumerate(blocks)
                   for n, m in blk.named_modules() if isinstance(m, torch.nn.Linear)},
                  args.row + ".weights.safetensors")
    records = report.engine.get("distributed")  # every rank's counters (none in one process)
    torch.set_num_threads(os.cpu_count() or 1)  # the other ranks have finished: evaluate on all
    test_ids = tokenize_text(tok, joined_text(load_rows("wikitext2-raw", "test")))
    res = perplexity(model, test_ids, seqlen=2048, windows=args.windows, progress=True)
    groups = [list(g) for g in get_adapter(model.config).groups]
    row = {"ranks": int(os.environ.get("WORLD_SIZE", "1")), "exact_stats": args.exact,
           "samples": args.samples, "compress_seconds": secs,
           "perplexity": res["perplexity"], "windows": res["windows"],
           "blocks": len(report.blocks), "distributed": records,
           "layers": [{k: r[k] for k in ("name", "seconds", "shape")} for r in report.layers],
           "block_seconds": [b["seconds"] for b in report.blocks], "groups": groups}
    Path(args.row).write_text(json.dumps(row))


def projection(one: dict, n: int, link_gbps: float, latency_us: float,
               comm: dict | None) -> dict:
    """The time at ``n`` ranks the one-rank split predicts (see the module's docstring)."""
    from llmc.engine.distributed import Distributed

    by_block: dict[int, list[dict]] = {}
    for r in one["layers"]:
        b = int(r["name"].split(".layers.")[1].split(".")[0])
        by_block.setdefault(b, []).append(r)
    solve = sum(r["seconds"] for r in one["layers"])
    total = sum(one["block_seconds"])
    rest = total - solve
    d = Distributed(0, n, "model", None)  # type: ignore[arg-type]
    solve_n = 0.0
    for layers in by_block.values():
        secs = {r["name"].split(".", 3)[3]: r for r in layers}
        for g in one["groups"]:
            members = {m: secs[m] for m in g if m in secs}
            if not members:
                continue
            owner = d.owners({m: float(r["shape"][1]) ** 2 * r["shape"][0]
                              for m, r in members.items()})
            per = [0.0] * n
            for m, r in members.items():
                per[owner[m]] += r["seconds"]
            solve_n += max(per)
    comm_s = 0.0
    if comm is not None and n > 1:
        comm_s = comm["bytes"] / (link_gbps * 1e9) + comm["collectives"] * latency_us * 1e-6
    t_n = rest / n + solve_n + comm_s
    return {"ranks": n, "seconds": t_n, "speedup": total / t_n, "solve_seconds": solve_n,
            "rest_seconds": rest / n, "comm_seconds": comm_s}


def r_exact(row: dict) -> bool:
    return bool(row.get("exact_stats"))


def render(rows: dict[str, dict], proj: list[dict], assumptions: str) -> str:
    lines = ["# Distributed calibration: GPTQ W4 g64, SmolLM2-135M-Instruct", "",
             "`python benchmarks/distributed.py` (torchrun, gloo, one thread per rank, on "
             f"{os.cpu_count()} CPU cores). Perplexity: first windows of 2048 tokens of the "
             "wikitext2 raw test split; calibration windows of 512 tokens of the validation split "
             "(128 unless the row says otherwise).", "",
             "| ranks | compress s | perplexity | bytes per block per rank | time in "
             "collectives (rank 0) |", "|---|---|---|---|---|"]
    for r in sorted(rows.values(), key=lambda r: (r_exact(r), r["ranks"])):
        n = f"{r['ranks']}"
        if r_exact(r):
            n += f" (float64 sums, {r['samples']} windows"
            if r.get("weights_equal_to_ranks", r["ranks"]) != r["ranks"]:
                n += (f"; weights equal to {r['weights_equal_to_ranks']} rank's: "
                      f"{r['weights_equal_fraction']:.4%}")
            n += ")"
        elif r["samples"] != 128:
            n += f" ({r['samples']} windows)"
        recs = r.get("distributed") or []
        bpb = f"{recs[0]['bytes'] / r['blocks'] / 2**20:.2f} MiB" if recs else "-"
        wait = f"{recs[0]['wait_seconds'] / r['compress_seconds']:.0%}" if recs else "-"
        lines.append(f"| {n} | {r['compress_seconds']:.1f} | {r['perplexity']:.3f} "
                     f"({r['windows']} windows) | {bpb} | {wait} |")
    lines += ["", "Projection from the one-rank split (" + assumptions + "):", "",
              "| ranks | predicted s | speedup | solves s | forwards + sums s | comm s |",
              "|---|---|---|---|---|---|"]
    for p in proj:
        lines.append(f"| {p['ranks']} | {p['seconds']:.1f} | {p['speedup']:.2f}x | "
                     f"{p['solve_seconds']:.1f} | {p['rest_seconds']:.1f} | "
                     f"{p['comm_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--link-gbps", type=float, default=100.0)
    p.add_argument("--latency-us", type=float, default=30.0)
    p.add_argument("--exact", action="store_true",
                   help="float64 statistics (exact_stats): the rows' weights are compared")
    p.add_argument("--row", help=argparse.SUPPRESS)  # set for the workers
    args = p.parse_args()
    if args.row:
        worker(args)
        return
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "distributed.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    rows = saved.get("rows", {})
    with tempfile.TemporaryDirectory() as tmp:
        weights = {}
        for n in args.ranks:
            key = f"{n}-exact" if args.exact else str(n)
            row = Path(tmp) / f"row-{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={n}", __file__, "--row", str(row), "--model", args.model,
                   "--samples", str(args.samples), "--calib-seqlen", str(args.calib_seqlen),
                   "--windows", str(args.windows), *(["--exact"] if args.exact else [])]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows[key] = json.loads(row.read_text())
            if args.exact:
                from safetensors.torch import load_file

                weights[n] = load_file(str(row) + ".weights.safetensors")
                first = weights[args.ranks[0]]
                rows[key]["weights_equal_to_ranks"] = args.ranks[0]
                rows[key]["weights_equal_fraction"] = sum(
                    int((first[k] == v).sum()) for k, v in weights[n].items()) / sum(
                    v.numel() for v in weights[n].values())
            print(f"{n} ranks: {rows[key]['compress_seconds']:.1f} s, perplexity "
                  f"{rows[key]['perplexity']:.3f}", flush=True)
            text = save(path, rows, args)  # after every row: a cut-off run keeps what it measured
    print(text)


def save(path: Path, rows: dict[str, dict], args: argparse.Namespace) -> str:
    """Write the rows and the projection (from the one-rank row, where there is one)."""
    proj, assumptions = [], (f"{args.link_gbps:g} GB/s per rank, {args.latency_us:g} us per "
                             "collective")
    if "1" in rows:
        comm = next((r["distributed"][0] for k, r in sorted(rows.items())
                     if r.get("distributed")), None)
        proj = [projection(rows["1"], n, args.link_gbps, args.latency_us, comm)
                for n in (1, 2, 4, 8)]
    out = {"rows": rows, "projection": proj, "assumptions": assumptions,
           "recipe": RECIPE, "cpu_cores": os.cpu_count()}
    path.write_text(json.dumps(out, indent=1))
    text = render(rows, proj, assumptions)
    (RESULTS / "distributed.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
