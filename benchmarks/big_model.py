"""The big-model engine, measured: models larger than this machine's memory streamed from disk
block by block, and the cost of streaming on the demo model.

The checkpoints are built here (``llmc.models.synthetic``): a random Llama-2-7B-shaped model
(32 blocks of 4096 x 11008, bf16 safetensors, 13.5 GB on disk, 27 GB in float32) and the same
width at 16 blocks, written tensor by tensor under ``--dir`` (never in the repository).

Rows, each in a fresh process (peak RSS is the process's ``VmHWM``; the page cache is dropped
before every 7B row so that the checkpoint is read from the disk):

- ``read``, ``write``: the disk's rates, with the I/O calls the engine makes: every tensor of
  the 7B checkpoint read one at a time (mapped and read in, then out of the page cache), and as
  many bytes as the RTN output written in pieces of a block's size (each on the disk, then out
  of the page cache, before the next);
- ``rtn-7b``, ``rtn-7b-16``: RTN w4 g128 at 32 and 16 blocks;
- ``gptq-7b`` (``gptq-7b-16``): GPTQ w4 g128 on 16 x 512 random-token windows, the walker's
  default settings (bf16 forwards, 8 windows per chunk);
- ``smollm2-stream``, ``smollm2-resident``: GPTQ w4 g64 on SmolLM2-135M with the README's
  calibration (128 x 512 wikitext2 windows, bf16), streamed from its GGUF file and resident;
  tensors compared, perplexity on the first 40 test windows of 2048;
- ``smollm2-baseline``: the resident row with the llmc found under ``--baseline-src`` (a
  checkout of the release before the engine, e.g. ``git worktree add /tmp/old bd50ef0`` and
  ``--baseline-src /tmp/old/src``): the time and memory the streamed row is held to;
- ``smollm2-resume``: the streamed run killed (SIGKILL) after block 15 and resumed.

Every row records the plan's peak-RSS estimate beside the measured peak. Results go to
``benchmarks/results/big_model.{json,md}`` as each row finishes.

    python benchmarks/big_model.py --dir /work/bench [--rows rtn-7b gptq-7b ...]
    python benchmarks/big_model.py --dir /work/bench --rows smollm2-baseline --baseline-src OLD/src
    python benchmarks/big_model.py --gpu --dir /scratch    # the GPU row (see gpu_row)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
ROWS = ["read", "write", "rtn-7b", "rtn-7b-16", "gptq-7b", "smollm2-resident",
        "smollm2-stream", "smollm2-resume"]
GIB = 2**30


def drop_caches() -> bool:
    """Empty the page cache (root only), so the next read comes from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def checkpoint(root: Path, blocks: int) -> Path:
    """The random 7B-shaped checkpoint with ``blocks`` blocks: written once (32 blocks); the
    16-block one links to its first 16 block shards and its last shard."""
    from llmc.models.synthetic import LLAMA2_7B, write_random_checkpoint

    full = root / "llama2-7b-random"
    if not (full / "config.json").is_file():
        t = time.perf_counter()
        write_random_checkpoint(full, LLAMA2_7B)
        print(f"wrote {full} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if blocks == 32:
        return full
    part = root / f"llama2-7b-random-{blocks}"
    if not (part / "config.json").is_file():
        part.mkdir(parents=True, exist_ok=True)
        index = json.loads((full / "model.safetensors.index.json").read_text())
        keep = {}
        for name, f in index["weight_map"].items():
            if name.startswith("model.layers.") and int(name.split(".")[2]) >= blocks:
                continue
            keep[name] = f
        for f in set(keep.values()):
            if not (part / f).exists():
                (part / f).symlink_to(full / f)
        (part / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": index["metadata"], "weight_map": keep}))
        cfg = json.loads((full / "config.json").read_text())
        cfg["num_hidden_layers"] = blocks
        (part / "config.json").write_text(json.dumps(cfg, indent=2))
    return part


def peak_rss() -> int:
    from llmc.engine.memory import peak_rss_bytes

    return peak_rss_bytes()


# -- rows, each run in its own process -------------------------------------------------------
def row_read(args: argparse.Namespace) -> dict[str, Any]:
    from llmc.core.safetensors import SafetensorsFile

    src = checkpoint(args.dir, 32)
    cold = drop_caches()
    t, n = time.perf_counter(), 0
    for f in sorted(src.glob("*.safetensors")):
        sf = SafetensorsFile(f)
        for k in sf.keys():
            x = sf.map(k)
            n += x.numel() * x.element_size()
            del x
            sf.drop_cache(k)
    dt = time.perf_counter() - t
    return {"bytes": n, "seconds": dt, "gb_per_s": n / dt / 1e9, "cold": cold}


def row_write(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from llmc.core.safetensors import write_file

    total = args.write_bytes
    out = args.dir / "write-probe"
    out.mkdir(exist_ok=True)
    piece = torch.randint(0, 2**31 - 1, (117 * 2**20 // 4,), dtype=torch.int32)
    t, n, i = time.perf_counter(), 0, 0
    while n < total:
        write_file(out / f"{i}.safetensors", {"x": piece}, durable=True)
        n += piece.numel() * 4
        i += 1
    os.sync()
    dt = time.perf_counter() - t
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    return {"bytes": n, "seconds": dt, "gb_per_s": n / dt / 1e9}


def _stream(src: str, recipe: dict, out: Path, calibration: Any = None,
            **kw: Any) -> dict[str, Any]:
    """One streamed compression in this process: wall time (including the final sync), RSS
    before it, peak RSS, the report."""
    import llmc
    from llmc.engine.memory import rss_bytes

    before = rss_bytes()
    t = time.perf_counter()
    _, report = llmc.compress(src, recipe, out=out, calibration=calibration, overwrite=True,
                              progress=False, device="cpu", **kw)
    os.sync()
    wall = time.perf_counter() - t
    peak = peak_rss()
    blocks = report.blocks
    return {
        "seconds": wall, "compress_seconds": report.seconds,
        "capture_seconds": report.capture_seconds,
        "block_seconds_mean": sum(b["seconds"] for b in blocks) / len(blocks),
        "block_seconds": [round(b["seconds"], 2) for b in blocks],
        "load_seconds_mean": sum(b["load_seconds"] for b in blocks) / len(blocks),
        "load_seconds": [round(b["load_seconds"], 2) for b in blocks],
        "pack_seconds": [round(b["pack_seconds"], 2) for b in blocks],
        "rss_before": before, "peak_rss": peak, "peak_rss_growth": peak - before,
        "plan_peak_rss": report.plan["peak_ram"],
        "plan_error": report.plan["peak_ram"] / peak - 1,
        "plan_seconds": report.plan["seconds"]["total"],
        "engine": report.engine, "output_bytes": sum(
            f.stat().st_size for f in out.iterdir() if f.is_file()),
        "source_bytes": sum(f.stat().st_size for f in Path(src).glob("*.safetensors"))
        if Path(src).is_dir() else None,
    }


RTN = {"steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 128}}]}
GPTQ_7B = {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 128}}]}
GPTQ_SMOL = {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 64}}],
             "calibration": {"dataset": "wikitext2", "samples": 128, "seqlen": 512, "seed": 0}}


def row_rtn(args: argparse.Namespace, blocks: int) -> dict[str, Any]:
    src = checkpoint(args.dir, blocks)
    drop_caches()
    return {"blocks": blocks, **_stream(str(src), RTN, args.dir / f"out-rtn-{blocks}")}


def row_gptq(args: argparse.Namespace, blocks: int) -> dict[str, Any]:
    import torch

    src = checkpoint(args.dir, blocks)
    windows = torch.randint(0, 32000, (16, 512), generator=torch.Generator().manual_seed(0))
    drop_caches()
    return {"blocks": blocks, "calibration": "16 x 512 random token ids",
            **_stream(str(src), GPTQ_7B, args.dir / f"out-gptq-{blocks}", windows)}


def _ppl(path: Path) -> float:
    import llmc

    model, tok = llmc.load(path)
    return llmc.evaluate(model, tok, seqlen=2048, windows=40, progress=False)["perplexity"]


def row_smollm2_stream(args: argparse.Namespace) -> dict[str, Any]:
    out = args.dir / "smollm2-stream"
    res = _stream("smollm2-135m", GPTQ_SMOL, out)
    return {**res, "perplexity": _ppl(out)}


def row_smollm2_resident(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    from table import PeakRSS

    import llmc
    from llmc.models import load_model

    with PeakRSS() as whole:  # the load too, as the streamed row's growth includes it
        model, tok = load_model("smollm2-135m")
        with PeakRSS() as mem:
            t = time.perf_counter()
            model, report = llmc.compress(model, GPTQ_SMOL, tokenizer=tok, progress=False)
            dt = time.perf_counter() - t
    out = args.dir / args.row
    llmc.save(model, out, tokenizer=tok, report=report, overwrite=True)
    return {"compress_seconds": dt, "peak_rss_growth": mem.peak - mem.start,
            "peak_rss_growth_with_load": whole.peak - whole.start, "perplexity": _ppl(out)}


def row_smollm2_resume(args: argparse.Namespace) -> dict[str, Any]:
    """Kill the streamed run (SIGKILL) once block 15 is saved, resume it, compare."""
    from llmc.engine.stream import partial_dir, read_state

    out = args.dir / "smollm2-resume"
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a finished earlier run: resume needs none there
    # timed from the compress call, as the uninterrupted row is (not the interpreter's start)
    code = ("import time, llmc; print('T0', time.time(), flush=True); "
            f"llmc.compress('smollm2-135m', {GPTQ_SMOL!r}, out={str(out)!r}, "
            "overwrite=True, progress=False, device='cpu')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    t0 = float(proc.stdout.readline().split()[1])
    partial = partial_dir(out)
    while proc.poll() is None:
        state = read_state(partial) if partial.exists() else None
        if state and state["blocks_done"] >= 15:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    first = time.time() - t0
    proc.wait()
    killed_at = read_state(partial)["blocks_done"]
    import llmc

    t = time.perf_counter()
    _, report = llmc.compress("smollm2-135m", GPTQ_SMOL, out=out, resume=True, progress=False,
                              device="cpu")
    os.sync()
    second = time.perf_counter() - t
    start = report.engine.get("resumed_from_block") or 0
    mine = [b for b in report.blocks if b["block"] >= start]  # the report keeps earlier ones
    blocks = sum(b["seconds"] for b in mine)
    return {"killed_after_blocks": killed_at, "first_seconds": first,
            "resumed_seconds": second, "resumed_from": report.engine.get("resumed_from_block"),
            "resumed_blocks": len(mine), "resumed_load_seconds": second - blocks,
            "block_seconds_mean": sum(b["seconds"] for b in report.blocks) / len(report.blocks)}


def run_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name == "read":
        return row_read(args)
    if name == "write":
        return row_write(args)
    if name.startswith("rtn-7b"):
        return row_rtn(args, 16 if name.endswith("-16") else 32)
    if name.startswith("gptq-7b"):
        return row_gptq(args, 16 if name.endswith("-16") else 32)
    return {"smollm2-stream": row_smollm2_stream, "smollm2-resident": row_smollm2_resident,
            "smollm2-baseline": row_smollm2_resident,
            "smollm2-resume": row_smollm2_resume}[name](args)


# -- the table ------------------------------------------------------------------------------------
def compare_outputs(a: Path, b: Path) -> bool:
    from llmc.core.safetensors import SafetensorsFile

    fa, fb = SafetensorsFile(a / "model.safetensors"), SafetensorsFile(b / "model.safetensors")
    if set(fa.keys()) != set(fb.keys()):
        return False
    import torch

    return all(fa.dtype(k) == fb.dtype(k) and torch.equal(fa.read(k), fb.read(k))
               for k in fa.keys())


def _mib(x: int | None) -> str:
    return "not measured" if x is None else f"{x / 2**20:.0f}"


def write_md(results: dict[str, Any]) -> None:
    r = results["rows"]
    lines = ["# Big-model engine", "", f"Machine: {results['machine']}.", ""]
    if "read" in r and "write" in r:
        lines += [f"Disk: reading the 7B checkpoint tensor by tensor (page cache dropped) ran at "
                  f"{r['read']['gb_per_s']:.2f} GB/s ({r['read']['seconds']:.1f} s for "
                  f"{r['read']['bytes'] / 1e9:.1f} GB); writing {r['write']['bytes'] / 1e9:.1f} "
                  f"GB and syncing at {r['write']['gb_per_s']:.2f} GB/s.", ""]
    lines += ["| row | wall s | per block s | peak RSS GiB | plan's peak GiB | plan error | "
              "notes |", "|---|---|---|---|---|---|---|"]
    for name, x in r.items():
        if "peak_rss" not in x:
            continue
        calibrated = x["engine"].get("calibrated", not name.startswith("rtn"))
        notes = f"cache {x['engine']['cache']}, {x['engine']['lockstep']}" if calibrated \
            else "no calibration"
        if name.startswith("rtn-7b") and "read" in r and "write" in r:
            io = (x["source_bytes"] / r["read"]["gb_per_s"]
                  + x["output_bytes"] / r["write"]["gb_per_s"]) / 1e9
            notes += f"; {x['seconds'] / io:.2f}x the read + write time ({io:.1f} s)"
        lines.append(f"| {name} | {x['seconds']:.1f} | {x['block_seconds_mean']:.2f} | "
                     f"{x['peak_rss'] / GIB:.2f} | {x['plan_peak_rss'] / GIB:.2f} | "
                     f"{x['plan_error'] * 100:+.0f}% | {notes} |")
    if "smollm2-stream" in r and "smollm2-resident" in r:
        s, m = r["smollm2-stream"], r["smollm2-resident"]
        lines += ["", "SmolLM2-135M, GPTQ w4 g64, 128 x 512 wikitext2 windows, bf16 forwards:", "",
                  "| path | perplexity (40 x 2048) | compress s | peak RSS growth MiB "
                  "(compress) | (load and compress) |",
                  "|---|---|---|---|---|",
                  f"| resident (`compress(model)`) | {m['perplexity']:.3f} | "
                  f"{m['compress_seconds']:.1f} | {m['peak_rss_growth'] / 2**20:.0f} | "
                  f"{_mib(m.get('peak_rss_growth_with_load'))} |",
                  f"| streamed from the GGUF file | {s['perplexity']:.3f} | "
                  f"{s['compress_seconds']:.1f} | | {s['peak_rss_growth'] / 2**20:.0f} |"]
        if "smollm2-baseline" in r:
            b = r["smollm2-baseline"]
            lines.append(f"| before the engine (resident, {results.get('baseline', '?')}) | "
                         f"{b['perplexity']:.3f} | {b['compress_seconds']:.1f} | "
                         f"{b['peak_rss_growth'] / 2**20:.0f} | "
                         f"{_mib(b.get('peak_rss_growth_with_load'))} |")
            lines += ["", f"Streamed compress time against before the engine: "
                      f"{s['compress_seconds'] / b['compress_seconds'] - 1:+.1%}."]
        lines += ["",
                  f"Same tensors, streamed and resident: {results.get('smollm2_same_tensors')}; "
                  f"streamed and before the engine: "
                  f"{results.get('smollm2_baseline_same_tensors', 'not run')}."]
    if "smollm2-resume" in r:
        x = r["smollm2-resume"]
        lines += ["", f"Resume: killed after block {x['killed_after_blocks']}, resumed from "
                  f"block {x['resumed_from']}: {x['first_seconds']:.1f} s + "
                  f"{x['resumed_seconds']:.1f} s."]
        if "smollm2-stream" in r:
            s = r["smollm2-stream"]
            over = x["first_seconds"] + x["resumed_seconds"] - s["seconds"]
            load = s["seconds"] - sum(s["block_seconds"])  # the uninterrupted run's load
            allowed = s["block_seconds_mean"] + load
            lines.append(f"Overhead against the uninterrupted run: {over:.1f} s; allowed: one "
                         f"block ({s['block_seconds_mean']:.1f} s) plus the load (the "
                         f"uninterrupted run's {load:.1f} s outside its blocks) = {allowed:.1f} "
                         f"s: {'met' if over <= allowed else 'missed'}. The resumed run spent "
                         f"{x['resumed_load_seconds']:.1f} s outside its {x['resumed_blocks']} "
                         "blocks (loading and restoring); every run is timed from its "
                         "compress call.")
    (RESULTS / "big_model.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/llmc-bench"))
    p.add_argument("--rows", nargs="+", default=ROWS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--write-bytes", type=int, default=4 * 10**9, help=argparse.SUPPRESS)
    p.add_argument("--gpu", action="store_true", help="the GPU row (see gpu_row)")
    p.add_argument("--baseline-src", type=Path,
                   help="an older llmc's src/ directory, for the smollm2-baseline row")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.row:
        print("RESULT " + json.dumps(run_row(args.row, args)), flush=True)
        return
    if args.gpu:
        gpu_row(args)
        return
    path = RESULTS / "big_model.json"
    results = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, " \
                         f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GIB:.0f} GiB"
    for name in args.rows:
        print(f"== {name}", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--row", name, "--dir", str(args.dir)]
        if name == "write" and "rtn-7b" in results["rows"]:
            cmd += ["--write-bytes", str(results["rows"]["rtn-7b"]["output_bytes"])]
        env = dict(os.environ)
        if name == "smollm2-baseline":
            if not args.baseline_src:
                raise SystemExit("the smollm2-baseline row needs --baseline-src OLD/src")
            env["PYTHONPATH"] = str(args.baseline_src.resolve())
            results["baseline"] = subprocess.run(
                ["git", "-C", str(args.baseline_src), "rev-parse", "--short", "HEAD"],
                capture_output=True, text=True).stdout.strip() or str(args.baseline_src)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not line:
            print(res.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"row {name} failed")
        results["rows"][name] = json.loads(line[0][7:])
        for other, key in (("smollm2-resident", "smollm2_same_tensors"),
                           ("smollm2-baseline", "smollm2_baseline_same_tensors")):
            pair = ("smollm2-stream", other)
            # compared when this run made one of the two and the other's output is on disk
            if name in pair and all((args.dir / p / "model.safetensors").is_file() for p in pair):
                results[key] = compare_outputs(*(args.dir / p for p in pair))
        path.write_text(json.dumps(results, indent=1))
        write_md(results)
        print(json.dumps(results["rows"][name])[:400], file=sys.stderr, flush=True)


def gpu_row(args: argparse.Namespace) -> None:
    """On a CUDA machine: the 7B shape built there from the config, GPTQ w4 g128 on 128 x 2048
    random-token windows with the model on the CPU and each block onloaded; time, peak device
    memory and peak RSS to ``benchmarks/results/big_model_gpu.json``."""
    import torch

    import llmc

    src = checkpoint(args.dir, 32)
    windows = torch.randint(0, 32000, (128, 2048), generator=torch.Generator().manual_seed(0))
    recipe = {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 128}}],
              "walker": {"dtype": "bfloat16", "batch_size": 8}}
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    _, report = llmc.compress(str(src), recipe, out=args.dir / "out-gpu", calibration=windows,
                              overwrite=True, progress=True, device="cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "seconds": time.perf_counter() - t, "peak_device_bytes":
           torch.cuda.max_memory_allocated(), "peak_rss": peak_rss(),
           "block_seconds": [b["seconds"] for b in report.blocks], "engine": report.engine,
           "plan": {k: report.plan[k] for k in ("peak_ram", "peak_device", "cache", "lockstep")}}
    (RESULTS / "big_model_gpu.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res)[:1000])


if __name__ == "__main__":
    main()
