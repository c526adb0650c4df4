"""The `llmc` command line through click's CliRunner, on a tiny model directory."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import llmc
from llmc.cli import cli


def run(*args: str, ok: bool = True):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def calib_flags(text_file):
    return ["--dataset", text_file, "--samples", 4, "--seqlen", 32, "--dtype", "float32",
            "--quiet"]


def test_quantize_evaluate_and_load(model_dir, text_file, tmp_path):
    out = tmp_path / "w4"
    run("quantize", model_dir, "--method", "gptq", "--bits", 4, "--group-size", 32,
        *calib_flags(text_file), "-o", out)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "llmc_report.json",
            "tokenizer.json"} <= files
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == 4 and qcfg["group_size"] == 32
    assert qcfg["desc_act"] is True and qcfg["static_groups"] is True
    report = json.loads((out / "llmc_report.json").read_text())
    assert len(report["layers"]) == 14 and report["calibration"]["samples"] == 4
    assert llmc.Recipe.from_yaml(out / "recipe.yaml").steps[0].config.group_size == 32

    res = run("evaluate", out, "--dataset", text_file, "--seqlen", 64, "--windows", 3, "--json")
    obj = json.loads(res.stdout)
    assert obj["windows"] == 3 and obj["tokens"] == 192 and obj["perplexity"] > 1
    model, tok = llmc.load(out)
    assert model.model.layers[1].mlp.down_proj.llmc_quant.bits == 4
    ref = llmc.evaluate(model, tok, dataset=str(text_file), seqlen=64, windows=3)
    assert ref["perplexity"] == pytest.approx(obj["perplexity"], rel=1e-6)


def test_output_is_never_overwritten_without_flag(model_dir, text_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = run("quantize", model_dir, "--method", "rtn", "-o", out, "--quiet", ok=False)
    assert res.exit_code != 0 and "--overwrite" in res.output
    assert (out / "keep.txt").read_text() == "precious"
    run("quantize", model_dir, "--method", "rtn", "--group-size", 32, "-o", out, "--overwrite",
        "--quiet")
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_compress_with_recipe(model_dir, text_file, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("steps:\n  - method: gptq\n    args: {bits: 3, group_size: 16, sym: false}\n"
                 "calibration: {samples: 4, seqlen: 32}\n")
    out = tmp_path / "x"
    run("compress", model_dir, "--recipe", r, "--dataset", text_file, "--quiet", "-o", out)
    saved = llmc.Recipe.from_yaml(out / "recipe.yaml")
    assert saved.calibration.dataset == str(text_file) and saved.steps[0].config.bits == 3
    model, _ = llmc.load(out)
    qw = model.model.layers[0].self_attn.q_proj.llmc_quant
    assert qw.bits == 3 and not qw.sym and qw.scales.shape[1] == 4


def test_methods_lists_arguments():
    res = run("methods")
    assert "gptq" in res.output and "act_order" in res.output and "rtn" in res.output
    rows = json.loads(run("methods", "--json").output)
    assert {r["name"] for r in rows} >= {"gptq", "rtn", "awq"}
    awq = next(r for r in rows if r["name"] == "awq")
    assert {"duo_scaling", "search_samples", "clip_grid"} <= {a["name"] for a in awq["args"]}


@pytest.mark.parametrize(
    "args, message",
    [
        (["quantize", "no/such/dir/", "-o", "{tmp}/o"], "not found"),
        (["quantize", "{model}", "--bits", "9", "-o", "{tmp}/o"], "bits"),
        (["quantize", "{model}", "--group-size", "4096", "-o", "{tmp}/o"], "group_size"),
        (["compress", "{model}", "--recipe", "{tmp}/missing.yaml", "-o", "{tmp}/o"],
         "recipe file not found"),
        (["quantize", "{model}", "--group-size", "32", "--seqlen", "32", "--dataset",
          "{tmp}/nope.txt", "-o", "{tmp}/o"], "nope.txt"),
        (["evaluate", "{model}", "--windows", "100000", "--dataset", "{text}", "--seqlen", "64"],
         "windows"),
    ],
)
def test_bad_input_is_one_line(args, message, model_dir, text_file, tmp_path):
    args = [a.format(tmp=tmp_path, model=model_dir, text=text_file) for a in args]
    res = run(*args, ok=False)
    assert res.exit_code != 0
    assert message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_key_fails_before_loading(model_dir, tmp_path, monkeypatch):
    r = tmp_path / "r.yaml"
    r.write_text("steps:\n  - method: gptq\n    args: {bitz: 4}\n")

    def boom(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("llmc.models.load_model", boom)
    res = run("compress", model_dir, "--recipe", r, "-o", tmp_path / "o", ok=False)
    assert "bitz" in res.output


def test_round_trip_is_bit_exact(model_dir, text_file, tmp_path):
    out = tmp_path / "w"
    run("quantize", model_dir, "--bits", 4, "--group-size", 48, "--asym", "--act-order",
        "dynamic", *calib_flags(text_file), "-o", out)
    model, _ = llmc.load(out)
    again = tmp_path / "again"
    llmc.save(model, again)
    m2, _ = llmc.load(again)
    for (n, a), b in zip(model.named_modules(), m2.modules()):
        if hasattr(a, "llmc_quant"):
            qa, qb = a.llmc_quant.codes(a.weight), b.llmc_quant.codes(b.weight)
            assert torch.equal(qa.q, qb.q) and torch.equal(qa.scales, qb.scales), n
            assert torch.equal(qa.zeros, qb.zeros) and torch.equal(qa.g_idx, qb.g_idx), n
            assert torch.equal(a.weight, b.weight), n


def test_calibration_longer_than_the_model_is_refused_before_loading(model_dir, tmp_path):
    res = run("quantize", model_dir, "--group-size", 32, "--seqlen", 4096, "-o", tmp_path / "o",
              ok=False)
    assert "calibration.seqlen: 4096" in res.output and not (tmp_path / "o").exists()


def test_quantized_input_is_refused(model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    run("quantize", model_dir, "--method", "rtn", "--group-size", 32, "-o", out, "--quiet")
    res = run("quantize", out, "--group-size", 32, "-o", tmp_path / "again", ok=False)
    assert "already gptq-quantized" in res.output


def test_export_between_formats(model_dir, text_file, tmp_path):
    src = tmp_path / "gptq"
    run("quantize", model_dir, "--method", "gptq", "--bits", 4, "--group-size", 32,
        *calib_flags(text_file), "-o", src)
    ct = tmp_path / "ct"
    run("export", src, "--format", "compressed-tensors", "-o", ct)
    assert json.loads((ct / "config.json").read_text())["quantization_config"][
        "quant_method"] == "compressed-tensors"
    assert {"tokenizer.json", "recipe.yaml", "llmc_report.json"} <= {p.name for p in ct.iterdir()}
    back = tmp_path / "back"
    run("export", ct, "--format", "gptq", "-o", back)
    a, _ = llmc.load(src)
    b, _ = llmc.load(back)
    for (n, x), y in zip(a.named_modules(), b.modules()):
        if hasattr(x, "llmc_quant"):
            assert torch.equal(x.llmc_quant.codes(x.weight).q, y.llmc_quant.codes(y.weight).q), n
    res = run("export", src, "--format", "awq", "-o", back, ok=False)
    assert res.exit_code != 0 and "--overwrite" in res.output
    res = run("export", model_dir, "--format", "awq", "-o", tmp_path / "x", ok=False)
    assert "not an llmc" in res.output


def test_distill_command(model_dir, text_file, tmp_path):
    student = tmp_path / "w4"
    run("quantize", model_dir, "--method", "gptq", "--bits", 4, "--group-size", 32,
        *calib_flags(text_file), "-o", student)
    out = tmp_path / "distilled"
    res = run("distill", student, "--teacher", model_dir, "--steps", 4, "--lr", 1e-3,
              "--train-batch", 2, "--heldout", 2, "--eval-every", 2, "--hidden-weight", 0.5,
              "--trainable", "scales", *calib_flags(text_file), "-o", out)
    assert "held-out KL" in res.output
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == 4  # the student's own format
    report = json.loads((out / "llmc_report.json").read_text())
    d = report["distill"][0]
    assert d["heldout_kl_best"] <= d["heldout_kl_start"] and d["heldout_windows"] == 2
    steps = llmc.Recipe.from_yaml(out / "recipe.yaml").steps
    assert [s.method for s in steps] == ["gptq", "distill"]
    assert (steps[1].config.hidden_weight, steps[1].config.trainable) == (0.5, "scales")
    model, _ = llmc.load(out)  # loads back, every quantized weight on its grid
    # refused before loading anything: an output that exists, a teacher of another shape
    res = run("distill", student, "--teacher", model_dir, *calib_flags(text_file), "-o", out,
              ok=False)
    assert res.exit_code != 0 and "--overwrite" in res.output
    res = run("distill", model_dir, "--teacher", model_dir, *calib_flags(text_file), "-o",
              tmp_path / "x", ok=False)
    assert res.exit_code != 0 and "compress a model first" in res.output


def test_quantize_with_a_named_scheme(model_dir, text_file, tmp_path):
    out = tmp_path / "fp8"
    run("quantize", model_dir, "--scheme", "fp8-dynamic", *calib_flags(text_file), "-o", out)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "float-quantized"
    recipe = llmc.Recipe.from_yaml(out / "recipe.yaml")
    assert [s.method for s in recipe.steps] == ["rtn"]  # data-free by default
    assert recipe.steps[0].config.type == "float" and recipe.steps[0].config.act_type == "float"
    out = tmp_path / "w8a8"
    run("quantize", model_dir, "--scheme", "w8a8-int8", "--method", "smoothquant+gptq",
        "--alpha", 0.6, *calib_flags(text_file), "-o", out)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "int-quantized"
    assert q["config_groups"]["group_0"]["input_activations"]["type"] == "int"
    recipe = llmc.Recipe.from_yaml(out / "recipe.yaml")
    assert [s.method for s in recipe.steps] == ["smoothquant", "gptq"]
    assert recipe.steps[0].config.alpha == 0.6
    res = run("evaluate", out, "--dataset", text_file, "--seqlen", 64, "--windows", 2, "--json")
    assert json.loads(res.stdout)["perplexity"] > 1


@pytest.mark.parametrize("args, match", [
    (["--method", "gptq", "--alpha", "0.5"], "--alpha is SmoothQuant's"),
    (["--scheme", "w8a8-int8", "--method", "awq"], "AWQ"),
    (["--scheme", "fp8-dynamic", "--format", "gptq"], "use --format compressed-tensors"),
])
def test_bad_scheme_combinations_are_refused(model_dir, tmp_path, args, match):
    res = run("quantize", model_dir, *args, "-o", tmp_path / "x", "--quiet", ok=False)
    assert res.exit_code != 0 and match in res.output
    assert not (tmp_path / "x").exists()


def test_quantize_nvfp4(model_dir, text_file, tmp_path):
    out = tmp_path / "nv"
    run("quantize", model_dir, "--scheme", "nvfp4", *calib_flags(text_file), "-o", out)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "nvfp4-pack-quantized"
    step = llmc.Recipe.from_yaml(out / "recipe.yaml").steps[0]
    assert (step.method, step.config.bits, step.config.group_size, step.config.type) == (
        "gptq", 4, 16, "float")
    model, _ = llmc.load(out)
    assert model.model.layers[0].mlp.up_proj.llmc_quant.global_scale > 0


@pytest.mark.parametrize("args, fmt", [
    (["--scheme", "nvfp4-w4a4"], "nvfp4-pack-quantized"),
    (["--scheme", "mxfp4"], "mxfp4-pack-quantized"),
    (["--scheme", "mxfp4-w4a4", "--method", "rtn"], "mxfp4-pack-quantized"),
    (["--scheme", "fp8-static", "--method", "rtn"], "float-quantized"),
    (["--group-size", "32", "--kv-cache", "fp8-head"], "pack-quantized"),
])
def test_quantize_schemes_and_kv_cache(model_dir, text_file, tmp_path, args, fmt):
    """The schemes that calibrate activation scales (NVFP4 W4A4's global scales, static
    FP8's), MXFP4 W4A4's (computed in the forward) and the KV cache's: streamed, written as
    compressed-tensors, read back and evaluated."""
    out = tmp_path / "o"
    run("quantize", model_dir, *args, *calib_flags(text_file), "-o", out)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == fmt
    if "--kv-cache" in args:
        assert q["kv_cache_scheme"]["strategy"] == "attn_head"
        assert llmc.Recipe.from_yaml(out / "recipe.yaml").kv_cache.strategy == "attn_head"
    else:
        assert q["kv_cache_scheme"] is None
    res = run("evaluate", out, "--dataset", text_file, "--seqlen", 64, "--windows", 2, "--json")
    assert json.loads(res.stdout)["perplexity"] > 1
