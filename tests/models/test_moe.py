"""Mixture-of-experts models: fused experts split into per-expert Linears (the same logits),
each expert calibrated on the tokens its router sends it, a starved expert's data-free fallback,
the all-experts option, the original per-expert checkpoint names in every format, and a
streamed MoE checkpoint."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import (
    MOE_ARCHS,
    assert_same_checkpoint,
    byte_tokenizer,
    calib_ids,
    output_tensors,
    tiny_model,
)

import llmc
from llmc.models import get_adapter
from llmc.models.moe import ExpertList, expert_lists, unfuse_experts

GPTQ = {"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 16}}],
        "walker": {"batch_size": 3}}
# what each format calls a quantized Linear's integer weight
PACKED = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_packed"}
# the per-expert names of the original checkpoints (what vLLM's MoE loaders read)
EXPERT_NAMES = {"mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2")),
                "qwen3_moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
                "qwen2_moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj"))}


def starve(model, expert: int = 0):
    """Route no token to ``expert`` in any block: every router's choice of it moves to the
    lowest-numbered expert the token does not already use."""
    def hook(module, args, out):
        logits, scores, idx = out
        idx = idx.clone()
        for row in idx:
            for j in range(len(row)):
                if row[j] == expert:
                    row[j] = next(e for e in range(module.num_experts)
                                  if e != expert and e not in row)
        return logits, scores, idx

    for block in model.model.layers:
        block.mlp.gate.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_split_experts_compute_the_same(arch):
    model = tiny_model(arch)
    x = calib_ids(2, 16)
    with torch.no_grad():
        ref = model(x).logits
        split = unfuse_experts(model)
        out = model(x).logits
    assert len(split) == model.config.num_hidden_layers
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for m in model.modules():
        assert getattr(m, "gate_up_proj", None) is None  # no fused parameter left


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_structure_lists_every_expert(arch):
    model = tiny_model(arch)
    unfuse_experts(model)
    a = get_adapter(model.config)
    E = len(expert_lists(a.get_blocks(model)[0])["mlp.experts"])
    _, (g, u, d) = EXPERT_NAMES[arch]
    for e in range(E):
        assert (f"mlp.experts.{e}.{g}", f"mlp.experts.{e}.{u}") in a.groups
        assert (f"mlp.experts.{e}.{d}",) in a.groups
    assert a.experts == ("mlp.experts",)
    assert a.routers == (("mlp.shared_expert_gate",) if arch == "qwen2_moe" else ())
    assert a.tail is None  # the MoE output is not one Linear's


def test_route_all_keeps_the_routed_output():
    """Every token through every expert changes the statistics, not the layer's output."""
    model = tiny_model("mixtral")
    unfuse_experts(model)
    x = calib_ids(2, 16)
    with torch.no_grad():
        ref = model(x).logits
        for m in model.modules():
            if isinstance(m, ExpertList):
                m.route_all = True
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-6)


def _expert_names(model, arch):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and ".experts." in n]


@pytest.mark.parametrize("fmt", list(PACKED))
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_every_expert_quantized_in_every_format(tmp_path, arch, fmt):
    x = calib_ids(12, 16)
    model, report = llmc.compress(tiny_model(arch), GPTQ, calibration=x, progress=False)
    experts = _expert_names(model, arch)
    assert set(experts) <= {r["name"] for r in report.layers}
    layer, names = EXPERT_NAMES[arch]
    E, L = model.config.num_local_experts if arch == "mixtral" else model.config.num_experts, \
        model.config.num_hidden_layers
    # tokens per expert: every expert of every block, top-k tokens routed in all
    assert len(report.experts) == E * L
    for b in range(L):
        rows = [r["tokens"] for r in report.experts if r["block"] == b]
        assert sum(rows) == x.numel() * model.config.num_experts_per_tok
    out = llmc.save(model, tmp_path / fmt, format=fmt)
    tensors = output_tensors(out)
    for b in range(L):
        for e in range(E):
            for n in names:
                key = f"model.layers.{b}.{layer}.{e}.{n}.{PACKED[fmt]}"
                assert key in tensors, key
    assert not any(".mlp.experts." in k for k in tensors) or layer == "mlp.experts"
    scales = [t for k, t in tensors.items() if "scale" in k]
    assert scales and all(torch.isfinite(t.float()).all() for t in scales)
    back, _ = llmc.load(out)
    with torch.no_grad():
        if fmt == "compressed-tensors":
            torch.testing.assert_close(back(x).logits, model(x).logits, rtol=0, atol=1e-4)
        else:
            assert torch.equal(back(x).logits, model(x).logits)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_starved_expert_falls_back_without_nan(caplog, method):
    x = calib_ids(12, 16)
    recipe = {"steps": [{"method": method, "args": {"bits": 4, "group_size": 16}}],
              "walker": {"batch_size": 3}}
    model = starve(tiny_model("mixtral"))
    with caplog.at_level(logging.WARNING, logger="llmc"):
        model, report = llmc.compress(model, recipe, calibration=x, progress=False)
    zero = [r for r in report.experts if r["expert"] == 0]
    assert len(zero) == model.config.num_hidden_layers
    assert all(r["tokens"] == 0 and r["statistics_rows"] == 0 for r in zero)
    # GPTQ falls back to RTN; AWQ leaves the expert unscaled and its RTN step needs no data
    want = ["gptq->rtn"] if method == "gptq" else None
    assert all(r["fallback"] == want for r in zero)
    assert all(r["fallback"] is None for r in report.experts if r["expert"] != 0)
    for b, block in enumerate(model.model.layers):
        for n in ("w1", "w3", "w2"):
            lin = block.mlp.experts[0].get_submodule(n)
            assert lin.llmc_quant is not None, (b, n)
            assert torch.isfinite(lin.weight).all()
            assert torch.isfinite(lin.llmc_quant.scales).all()
    if method == "awq":
        skipped = [p for t in report.transforms for p in t["pairs"] if "skipped" in p]
        assert {p["prev"] for p in skipped} == {"mlp.experts.0.w3"}
    assert ("routed calibration tokens" if method == "gptq" else "no AWQ scales") in caplog.text


def test_all_experts_feeds_every_token_to_every_expert():
    x = calib_ids(12, 16)
    recipe = {**GPTQ, "walker": {"batch_size": 3, "all_experts": True}}
    model, report = llmc.compress(starve(tiny_model("mixtral")), recipe, calibration=x,
                                  progress=False)
    assert all(r["statistics_rows"] == x.numel() for r in report.experts)
    assert all(r["fallback"] is None for r in report.experts)
    assert [r["tokens"] for r in report.experts if r["expert"] == 0] == [0, 0]


def test_lockstep_and_replay_agree_on_moe():
    """Chunks that route nothing to an expert still pass its barrier (an empty call)."""
    x = calib_ids(12, 16)
    a, _ = llmc.compress(starve(tiny_model("qwen2_moe")), GPTQ, calibration=x, progress=False,
                         lockstep="lockstep")
    b, _ = llmc.compress(starve(tiny_model("qwen2_moe")), GPTQ, calibration=x, progress=False,
                         lockstep="replay")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_router_stays_dense_unless_named():
    x = calib_ids(12, 16)
    model, report = llmc.compress(tiny_model("qwen2_moe"), GPTQ, calibration=x, progress=False)
    assert not any(r["name"].endswith("shared_expert_gate") for r in report.layers)
    assert any(r["name"].endswith("shared_expert.down_proj") for r in report.layers)
    named = {"steps": [{"method": "rtn", "targets": ["re:.*shared_expert_gate$"],
                        "args": {"bits": 8, "group_size": -1}}]}
    _, report = llmc.compress(tiny_model("qwen2_moe"), named, progress=False)
    assert {r["name"].rsplit(".", 1)[-1] for r in report.layers} == {"shared_expert_gate"}


def test_streamed_moe_checkpoint_equals_resident(tmp_path):
    """A Mixtral checkpoint as transformers saves it (block_sparse_moe.experts.E.w1 ...) streams
    block by block into the same checkpoint as the resident path writes."""
    src = tmp_path / "mixtral"
    tiny_model("mixtral").save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    x = calib_ids(12, 16)
    out, report = llmc.compress(str(src), GPTQ, calibration=x, out=tmp_path / "s",
                                progress=False, device="cpu")
    assert report.engine["streaming"] and report.experts
    model, _ = llmc.models.load_model(str(src))
    model, _ = llmc.compress(model, GPTQ, calibration=x, progress=False)
    llmc.save(model, tmp_path / "m")
    assert_same_checkpoint(out, tmp_path / "m")
    assert any("block_sparse_moe.experts.3.w2" in k for k in output_tensors(out))


def test_cli_all_experts(tmp_path, text_file):
    import json

    from click.testing import CliRunner

    from llmc.cli import cli

    src = tmp_path / "mixtral"
    tiny_model("mixtral").save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    out = tmp_path / "q"
    res = CliRunner().invoke(cli, [str(a) for a in (
        "quantize", src, "--method", "gptq", "--bits", 4, "--group-size", 16, "--dataset",
        text_file, "--samples", 4, "--seqlen", 32, "--all-experts", "--min-expert-tokens", 8,
        "--quiet", "-o", out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    walker = llmc.Recipe.from_yaml(out / "recipe.yaml").walker
    assert walker.all_experts is True and walker.min_expert_tokens == 8
    report = json.loads((out / "llmc_report.json").read_text())
    assert report["experts"] and all(r["statistics_rows"] == 4 * 32 for r in report["experts"])
