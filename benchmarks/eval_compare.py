"""FP, GPTQ w4, AWQ w4 and SparseGPT 2:4 SmolLM2-135M compared in one ``llmc evaluate
--compare`` command: Wikitext-2 perplexity (the GPTQ protocol's first ``--windows`` windows),
two lm-eval tasks over local files, size on disk and bits per weight; and the HTML report of the
GPTQ run (its size, and whether a headless Chromium draws every plot).

No hub: the tasks are built here from the Wikitext-2 test text (``LLMC_DATA_DIR``), seeded, into
``--dir`` (never committed):

- ``wikitext_lastword``: LAMBADA's form, a paragraph without its last word; accuracy of the
  greedy continuation and the word's perplexity (lm-eval ``loglikelihood``);
- ``wikitext_nextsentence``: HellaSwag's form, a paragraph's opening sentences and four
  candidates for the next one, three of them from other paragraphs (``multiple_choice``).

Run: ``python benchmarks/eval_compare.py [--dir /tmp/llmc-eval] [--windows 40] [--limit 500]``;
writes ``benchmarks/results/eval_compare.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m"
CAL = ["--samples", "128", "--seqlen", "512", "--seed", "0"]
ROWS = {  # name: the compressing command's arguments after the model
    "gptq-w4g64": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "64"],
    "awq-w4g64": ["quantize", "--method", "awq", "--bits", "4", "--group-size", "64"],
    "sparsegpt-2:4": ["prune", "--method", "sparsegpt", "--pattern", "2:4"],
}


def paragraphs(path: Path) -> list[str]:
    """Wikitext-2 test paragraphs (not headings) of at least 40 words, as plain text."""
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("=") and len(line.split()) >= 40:
            out.append(detokenize(line))
    return out


def detokenize(text: str) -> str:
    """Wikitext's spaced punctuation back to plain text."""
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" 's", "'s"),
                 (" n't", "n't"), ("( ", "("), (" )", ")"), ('" ', '"')):
        text = text.replace(a, b)
    return re.sub(r" ([.,;:!?])", r"\1", text)


def write_tasks(data: Path, out: Path, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    paras = paragraphs(data / "wikitext-2-raw-v1" / "wiki.test.raw")
    lastword, nextsent = [], []
    for p in paras:
        m = re.fullmatch(r"(.+) ([A-Za-z][A-Za-z-]*)[.!?]", p)  # the last word before a stop
        if m:
            lastword.append({"context": m.group(1), "target": " " + m.group(2)})
    sentences = [re.split(r"(?<=[.!?]) (?=[A-Z])", p) for p in paras]
    pool = [s for ss in sentences for s in ss if len(s.split()) >= 6]
    for ss in sentences:
        if len(ss) >= 3 and len(ss[2].split()) >= 6:
            wrong = rng.sample(pool, 3)
            choices = [" " + ss[2]] + [" " + w for w in wrong]
            order = list(range(4))
            rng.shuffle(order)
            nextsent.append({"context": " ".join(ss[:2]),
                             "choices": [choices[i] for i in order],
                             "answer": order.index(0)})
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, rows, body in (
        ("wikitext_lastword", lastword,
         "output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\n"
         "doc_to_target: \"{{target}}\"\nmetric_list:\n"
         "  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"
         "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"),
        ("wikitext_nextsentence", nextsent,
         "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
         "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n"
         "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
         "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"),
    ):
        rng.shuffle(rows)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {name}.jsonl\ntest_split: test\n{body}metadata:\n  version: 1.0\n")
        files.append(out / f"{name}.yaml")
    return files


def llmc(*args: str) -> tuple[str, float]:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "llmc", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"llmc {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return res.stdout, time.perf_counter() - t


def browser_check(page: Path) -> dict:
    """Chromium's view of the page: images, images drawn, script errors (the probe of
    tests/test_report.py)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return {"browser": None}
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from test_report import PROBE

    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("<body>", "<body>" + PROBE, 1))
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    attrs = dict(re.findall(r'(data-[a-z]+)="([^"]*)"', re.search(r"<body([^>]*)>",
                                                                   dom).group(1)))
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout
    return {"browser": version.strip(), "images": int(attrs["data-images"]),
            "drawn": int(attrs["data-drawn"]), "errors": attrs["data-errors"]}


def packed_check(out: Path, task: Path, limit: int) -> dict:
    """Packed (QuantLinear codes through the kernels' torch path) against dequantized: the
    largest difference of any answer's log-likelihood on ``task``."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
    import llmc
    from llmc.eval.tasks import evaluate_tasks

    lls = {}
    for packed in (False, True):
        model, tok = llmc.load(out, packed=packed)
        t = time.perf_counter()
        res = evaluate_tasks(model, tok, [str(task)], limit=limit, log_samples=True)
        docs = sorted(res["samples"][res["tasks"][0]], key=lambda s: s["doc_id"])
        lls[packed] = ([float(r[0][0]) for s in docs for r in s["resps"]],
                       time.perf_counter() - t)
    diff = max(abs(a - b) for a, b in zip(lls[False][0], lls[True][0], strict=True))
    return {"model": out.name, "task": task.stem, "requests": len(lls[False][0]),
            "max_abs_loglikelihood_diff": diff, "seconds_dequantized": lls[False][1],
            "seconds_packed": lls[True][1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llmc-eval"))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--packed-only", action="store_true",
                    help="Only the packed-against-dequantized check, on an earlier run's GPTQ "
                         "output in --dir, added to the JSON")
    args = ap.parse_args()
    data = Path(os.environ.get("LLMC_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
    tasks = write_tasks(data, args.dir / "tasks")
    check_args = (args.dir / "gptq-w4g64", tasks[0], 100)
    if args.packed_only:
        record = json.loads((RESULTS / "eval_compare.json").read_text())
        record["packed"] = packed_check(*check_args)
        (RESULTS / "eval_compare.json").write_text(json.dumps(record, indent=2) + "\n")
        print(write_markdown(record))
        return
    record: dict = {"machine": f"{platform.processor() or platform.machine()}, "
                               f"{os.cpu_count()} CPUs, torch threads default",
                    "model": MODEL, "calibration": " ".join(CAL), "windows": args.windows,
                    "limit": args.limit, "compress": {}}
    outs = []
    for name, cmd in ROWS.items():
        out = args.dir / name
        full = [cmd[0], MODEL, *cmd[1:], *CAL, "-o", str(out), "--overwrite", "--quiet"]
        _, seconds = llmc(*full)
        record["compress"][name] = {"command": "llmc " + " ".join(full), "seconds": seconds}
        outs.append(str(out))
        print(f"{name}: {seconds:.1f} s", file=sys.stderr)
    compare = ["evaluate", "--compare", MODEL, *outs, "--windows", str(args.windows),
               "--tasks", ",".join(map(str, tasks)), "--limit", str(args.limit), "--json"]
    stdout, seconds = llmc(*compare)
    rows = json.loads(stdout)
    for r in rows:
        r.pop("lm_eval", None)
    record.update(command="llmc " + " ".join(compare), seconds=seconds, rows=rows)
    page = args.dir / "gptq-w4g64" / "llmc_report.html"
    record["report"] = {"bytes": page.stat().st_size, **browser_check(page)}
    record["packed"] = packed_check(*check_args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_compare.json").write_text(json.dumps(record, indent=2) + "\n")
    print(write_markdown(record))


def write_markdown(record: dict) -> str:
    sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
    from llmc.eval.compare import markdown_table

    rows = [{**r, "model": Path(r["model"]).name} for r in record["rows"]]
    rep, packed = record["report"], record.get("packed")
    md = (f"# One `llmc evaluate --compare` run\n\n{record['machine']}; calibration "
          f"{record['calibration']}; perplexity over the first {record['windows']} Wikitext-2 "
          f"test windows of 2048; tasks over the first {record['limit']} documents of each "
          f"(benchmarks/eval_compare.py builds them from the Wikitext-2 test text).\n\n"
          f"{markdown_table(rows)}\n\nEvaluation of the four models: "
          f"{record['seconds']:.0f} s. HTML report of the GPTQ run: {rep['bytes'] / 1e6:.2f} "
          f"MB, {rep.get('drawn')} of {rep.get('images')} plots drawn by {rep.get('browser')}.")
    if packed:
        md += (f" Packed GPTQ against dequantized, {packed['requests']} {packed['task']} "
               f"requests: largest log-likelihood difference "
               f"{packed['max_abs_loglikelihood_diff']:.2e}.")
    (RESULTS / "eval_compare.md").write_text(md + "\n")
    return md


if __name__ == "__main__":
    main()
