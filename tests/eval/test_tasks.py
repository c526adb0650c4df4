"""Task evaluation through lm-eval on local task files: the numbers equal lm-eval's own ``hf``
model's, packed equals dequantized, bad tasks fail before any model loads, and
``llmc evaluate --compare`` gives one table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, calib_ids, tiny_model
from test_cli import run

import llmc

lm_eval = pytest.importorskip("lm_eval", reason="pip install 'llmc-compress[eval]'")

TASKS = Path(__file__).parents[1] / "data" / "lm_eval"
CHOICE, CLOZE = TASKS / "tiny_choice.yaml", TASKS / "tiny_cloze.yaml"


def loglikelihoods(result: dict, task: str) -> list[float]:
    """Every answer's log-likelihood, in document order."""
    docs = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [float(r[0][0]) for s in docs for r in s["resps"]]


def test_scores_equal_lm_evals_own_hf_model(model_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llmc.eval.tasks import evaluate_tasks, prepare_tasks

    model, tok = llmc.load(model_dir)
    ours = evaluate_tasks(model, tok, [str(CHOICE), str(CLOZE)], log_samples=True)
    # lm-eval loading the same directory itself; its task manager reads the YAMLs by name
    theirs = simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=["llmc_tiny_choice", "llmc_tiny_cloze"], log_samples=True, device="cpu",
        task_manager=TaskManager(include_path=str(_absolute_tasks(model_dir.parent))))
    for task in ("llmc_tiny_choice", "llmc_tiny_cloze"):
        assert loglikelihoods(ours, task) == loglikelihoods(theirs, task)
        assert ours["results"][task] == json.loads(json.dumps(theirs["results"][task]))
    assert len(loglikelihoods(ours, "llmc_tiny_choice")) == 18  # every choice of the 6 questions
    assert prepare_tasks(f"{CHOICE},{CLOZE}").names == ["llmc_tiny_choice", "llmc_tiny_cloze"]


def _absolute_tasks(tmp: Path) -> Path:
    """The test tasks copied with their JSONL paths made absolute (lm-eval's own loader reads
    relative paths from the working directory)."""
    d = tmp / "tasks"
    d.mkdir(exist_ok=True)
    for yaml_file in (CHOICE, CLOZE):
        jsonl = yaml_file.with_suffix(".jsonl")
        shutil.copy(jsonl, d / jsonl.name)
        (d / yaml_file.name).write_text(yaml_file.read_text().replace(
            f"test: {jsonl.name}", f"test: {d / jsonl.name}"))
    return d


def test_packed_matches_dequantized(tmp_path):
    from llmc.eval.tasks import evaluate_tasks

    model = tiny_model("llama")
    model, report = llmc.compress(model, {"steps": [{"method": "gptq", "args": {
        "bits": 4, "group_size": 32}}]}, calibration=calib_ids(8, 32), progress=False)
    out = llmc.save(model, tmp_path / "q", tokenizer=byte_tokenizer(), report=report)
    dense, tok = llmc.load(out)
    packed, _ = llmc.load(out, packed=True)
    assert any(type(m).__name__ == "QuantLinear" for m in packed.modules())
    a = evaluate_tasks(dense, tok, [str(CHOICE)], log_samples=True)
    b = evaluate_tasks(packed, tok, [str(CHOICE)], log_samples=True)
    la, lb = loglikelihoods(a, "llmc_tiny_choice"), loglikelihoods(b, "llmc_tiny_choice")
    assert torch.allclose(torch.tensor(la), torch.tensor(lb), atol=1e-3, rtol=0)


def test_limit_and_fewshot():
    model, tok = tiny_model("llama"), byte_tokenizer()
    res = llmc.evaluate(model, tok, tasks=[str(CHOICE)], limit=2, num_fewshot=1)
    assert res["lm_eval"]["n-samples"]["llmc_tiny_choice"]["effective"] == 2
    assert res["lm_eval"]["n-shot"]["llmc_tiny_choice"] == 1
    assert set(res["tasks"]) == {"llmc_tiny_choice/acc", "llmc_tiny_choice/acc_norm"}
    assert "perplexity" not in res  # tasks alone unless asked


def test_bad_tasks_fail_before_the_model_loads(tmp_path):
    from llmc.eval.tasks import prepare_tasks

    broken = tmp_path / "broken"  # resolves as a model directory, but would fail to load
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    res = run("evaluate", broken, "--tasks", "arc_easyy", ok=False)
    assert res.exit_code != 0 and "does not know the task 'arc_easyy'" in res.output
    assert "arc_easy" in res.output and len(res.output.strip().splitlines()) == 1
    bad = tmp_path / "t.yaml"
    bad.write_text(CHOICE.read_text().replace("tiny_choice.jsonl", "missing.jsonl"))
    res = run("evaluate", broken, "--tasks", bad, ok=False)
    assert res.exit_code != 0 and "missing.jsonl not found" in res.output
    with pytest.raises(ValueError, match="task file not found"):
        prepare_tasks("nowhere.yaml")
    with pytest.raises(ValueError, match="needs a 'task: NAME'"):
        (tmp_path / "x.yaml").write_text("dataset_path: json\n")
        prepare_tasks(str(tmp_path / "x.yaml"))
    res = run("evaluate", broken, "--limit", 3, ok=False)
    assert res.exit_code != 0 and "apply to --tasks" in res.output
    res = run("evaluate", broken, broken, ok=False)
    assert res.exit_code != 0 and "--compare" in res.output


def test_cli_tasks_and_compare(model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    run("quantize", model_dir, "--method", "gptq", "--group-size", 32, "--dataset", text_file,
        "--samples", 4, "--seqlen", 32, "-o", out, "--quiet")
    res = run("evaluate", out, "--tasks", CHOICE, "--json")
    obj = json.loads(res.stdout)
    assert obj["model"] == str(out) and "perplexity" not in obj
    assert obj["lm_eval"]["results"]["llmc_tiny_choice"]["acc_stderr,none"] >= 0
    model, tok = llmc.load(out)
    ref = llmc.evaluate(model, tok, tasks=[str(CHOICE)])
    assert ref["tasks"] == obj["tasks"]

    ppl = ["--dataset", text_file, "--seqlen", 64, "--windows", 2]
    res = run("evaluate", "--compare", model_dir, out, "--tasks", CHOICE, *ppl, "--json")
    rows = json.loads(res.stdout)
    assert [r["model"] for r in rows] == [str(model_dir), str(out)]
    fp, q = rows
    assert fp["bits_per_weight"] == pytest.approx(32)  # the tiny model is stored in float32
    assert 4 < q["bits_per_weight"] < 6  # 4-bit codes, fp16 scales and zeros per 32 columns
    assert q["size_bytes"] < fp["size_bytes"]
    assert fp["perplexity"] > 1 and q["perplexity"] > 1 and fp["windows"] == 2
    assert set(fp["stderr"]) == set(fp["tasks"])
    res = run("evaluate", "--compare", model_dir, out, "--tasks", CHOICE, *ppl)
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("| model | perplexity | llmc_tiny_choice/acc |")
    assert len(lines) == 4 and str(out) in lines[3]
