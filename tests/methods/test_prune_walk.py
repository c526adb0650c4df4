"""Pruning inside the layer walker: composition with quantization in one walk, OWL's planned
ratios, per-layer overrides, saving and loading, and `llmc prune`."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import ARCHS, calib_ids, tiny_model

import llmc
from llmc.checks import check_model
from llmc.cli import cli
from llmc.models import block_linears
from llmc.recipe import Recipe


def linears(model):
    return {f"model.layers.{b}.{n}": m for b, layer in enumerate(model.model.layers)
            for n, m in block_linears(layer).items()}


def compress(steps, arch="llama", **recipe):
    model = tiny_model(arch)
    return llmc.compress(model, {"steps": steps, **recipe}, calibration=calib_ids(),
                         progress=False)


def test_sparsegpt_24_then_gptq_in_one_walk():
    model, report = compress([
        {"method": "sparsegpt", "args": {"pattern": "2:4"}},
        {"method": "gptq", "args": {"bits": 4, "group_size": 32}},
    ])
    for name, lin in linears(model).items():
        W = lin.weight.data
        assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all(), name
        lin.llmc_quant.codes(W, name)  # on its grid, or raises
        assert not hasattr(lin, "llmc_mask")  # masks live for one block only
    steps = {(r["name"], r["step"]): r for r in report.layers}
    assert all(r["sparsity"] == 0.5 for r in steps.values())
    assert {r["step"] for r in report.layers} == {0, 1}


def test_wanda_then_awq_keeps_the_zeros():
    model, report = compress([
        {"method": "wanda", "args": {"sparsity": 0.5}},
        {"method": "awq", "args": {"bits": 4, "group_size": 32}},
    ])
    assert [s["method"] for s in report.recipe["steps"]] == ["wanda", "awq", "rtn"]
    pruned = {r["name"]: r["sparsity"] for r in report.layers if r["method"] == "wanda"}
    for name, lin in linears(model).items():
        zeros = float((lin.weight == 0).float().mean())
        assert zeros >= pruned[name] == 0.5
        lin.llmc_quant.codes(lin.weight, name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_walks_every_architecture(arch, method):
    model, report = compress([{"method": method, "args": {"pattern": "2:4"}}], arch=arch)
    assert report.layers and all(r["sparsity"] == 0.5 for r in report.layers)
    with torch.no_grad():
        logits = model(calib_ids(2, 16)).logits
    assert torch.isfinite(logits).all()


def test_owl_plans_block_ratios_that_average_to_the_target():
    model, report = compress([{"method": "wanda", "args": {"sparsity": 0.6, "owl": True,
                                                              "owl_lambda": 0.1}}])
    (plan,) = report.plans
    ratios = plan["owl"]["block_sparsity"]
    assert len(ratios) == 2 and sum(ratios) / 2 == pytest.approx(0.6)
    assert abs(ratios[0] - ratios[1]) == pytest.approx(0.2)
    for r in report.layers:
        b = int(r["name"].split(".")[2])
        assert r["sparsity"] == pytest.approx(ratios[b], abs=1 / 64)  # whole weights per row


def test_layer_sparsity_and_ignore():
    model, report = compress([{
        "method": "magnitude", "ignore": ["lm_head", "re:layers\\.1\\.self_attn"],
        "args": {"sparsity": 0.5, "layer_sparsity": {"down_proj": 0.25}},
    }])
    got = {r["name"]: r["sparsity"] for r in report.layers}
    assert got["model.layers.0.mlp.down_proj"] == 0.25
    assert got["model.layers.0.mlp.up_proj"] == 0.5
    assert not any("layers.1.self_attn" in n for n in got)
    assert float((model.model.layers[1].self_attn.q_proj.weight == 0).float().mean()) == 0.0


def test_pattern_must_divide_the_input_widths():
    with pytest.raises(ValueError, match="divisible by 5.*ignore"):
        check_model(Recipe.from_dict({"steps": [{"method": "wanda", "args": {"pattern": "2:5"}}]}),
                    tiny_model().config)


def test_pruned_checkpoint_is_dense_with_its_sparsity_recorded(tmp_path, tokenizer):
    model, report = compress([{"method": "sparsegpt", "args": {"sparsity": 0.5}}])
    out = llmc.save(model, tmp_path / "p", tokenizer=tokenizer, report=report)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["llmc_sparsity"] == {"structure": "unstructured", "sparsity": 0.5,
                                    "pruned_layers": 14, "storage": "dense"}
    back, _ = llmc.load(out)
    for (n, a), b in zip(linears(model).items(), linears(back).values()):
        assert torch.equal(a.weight, b.weight), n
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(hf.model.layers[1].mlp.up_proj.weight,
                       model.model.layers[1].mlp.up_proj.weight)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_pruned_and_quantized_checkpoint_keeps_its_zeros(tmp_path, fmt):
    model, report = compress([{"method": "sparsegpt",
                               "args": {"pattern": "2:4", "bits": 4, "group_size": 32}}])
    out = llmc.save(model, tmp_path / fmt, report=report, format=fmt)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == fmt
    assert cfg["llmc_sparsity"]["structure"] == "2:4"
    back, _ = llmc.load(out)
    for (n, a), b in zip(linears(model).items(), linears(back).values()):
        assert torch.equal(a.weight, b.weight), n
        W = b.weight
        assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all()


def run_cli(*args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_cli_prune(model_dir, text_file, tmp_path):
    flags = ["--dataset", text_file, "--samples", 4, "--seqlen", 32, "--quiet"]
    out = tmp_path / "wanda"
    run_cli("prune", model_dir, "--method", "wanda", "--sparsity", 0.4, *flags, "-o", out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["llmc_sparsity"]["sparsity"] == pytest.approx(0.4, abs=0.01)  # whole rows
    res = run_cli("evaluate", out, "--dataset", text_file, "--seqlen", 64, "--windows", 2,
                  "--json")
    assert json.loads(res.stdout)["perplexity"] > 1

    out = tmp_path / "24w4"
    run_cli("prune", model_dir, "--method", "wanda", "--pattern", "2:4", "--bits", 4,
            "--group-size", 32, *flags, "-o", out)
    recipe = Recipe.from_yaml(out / "recipe.yaml")
    assert [s.method for s in recipe.steps] == ["wanda", "gptq"]
    model, _ = llmc.load(out)
    W = model.model.layers[0].mlp.down_proj.weight
    assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all()

    res = run_cli("prune", model_dir, "--pattern", "3:2", *flags, "-o", tmp_path / "bad",
                  ok=False)
    assert res.exit_code != 0 and "0 < N < M" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "bad").exists()
