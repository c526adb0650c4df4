"""AWQ: the scale search on one pair, function-preserving scaling maps of every architecture,
AWQ with RTN and with GPTQ in one walk, and the recipe rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ARCHS, calib_ids, tiny_config, tiny_model

import llmc
from llmc import models
from llmc.core.scheme import QuantScheme, output_error
from llmc.core.stats import HessianStats
from llmc.methods.awq import (
    AWQConfig,
    apply_scales,
    clip_weight,
    expand_tied,
    fake_quant_scaled,
    gptq_scaled,
    head_tie,
    hessian_loss,
    refine_for_gptq,
    search_scales,
)
from llmc.methods.gptq import GPTQConfig, gptq_quantize
from llmc.methods.rtn import rtn_quantize
from llmc.recipe import Recipe


def norm_linear_pair(K: int = 128, N: int = 64, n: int = 4096, seed: int = 0):
    """A norm weight ``g`` feeding a Linear W: the Linear's inputs ``x * g`` have two outlier
    channels (about 30x), the rest correlated low-rank plus noise."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=gen) @ torch.randn(4, K, generator=gen)
    X += torch.randn(n, K, generator=gen)
    g = torch.ones(K)
    g[[5, 77]] = 30.0
    W = torch.randn(N, K, generator=gen) / K**0.5
    return g, W, X


def test_scales_beat_rtn_on_an_outlier_pair():
    g, W, X = norm_linear_pair()
    Xg = X * g
    stats = HessianStats(128)
    stats.add_batch(Xg)
    scheme = QuantScheme(4, 32, True)
    x_mean = Xg.abs().mean(dim=0)
    res = search_scales([W], x_mean, hessian_loss(stats.H, [W]), scheme, grid=20, duo=False)
    assert res.alpha > 0
    # Apply the scales as the walker does: the norm divides, the Linear multiplies.
    s = res.scales
    g_scaled, W_scaled = g / s, W * s
    torch.testing.assert_close((X * g_scaled) @ W_scaled.T, Xg @ W.T, rtol=1e-4, atol=1e-4)
    Wq = rtn_quantize(W_scaled, scheme).dequantize()
    out_awq = (X * g_scaled) @ Wq.T
    out_rtn = Xg @ rtn_quantize(W, scheme).dequantize().T
    ref = Xg @ W.T
    err_awq = (out_awq - ref).pow(2).sum()
    err_rtn = (out_rtn - ref).pow(2).sum()
    assert err_awq < 0.7 * err_rtn
    # The search's own loss agrees with the measured error of the chosen candidate.
    assert min(res.losses) == pytest.approx(
        float(2 * err_awq / X.shape[0]), rel=1e-2)
    assert res.losses[0] == pytest.approx(float(2 * err_rtn / X.shape[0]), rel=1e-2)


def test_duo_scaling_also_beats_rtn():
    g, W, X = norm_linear_pair(seed=1)
    Xg = X * g
    H = 2 * Xg.T @ Xg / Xg.shape[0]
    scheme = QuantScheme(3, 32, True)
    res = search_scales([W], Xg.abs().mean(0), hessian_loss(H, [W]), scheme, duo=True)
    assert min(res.losses) < 0.8 * res.losses[0]


def test_zero_and_nonfinite_activations_are_guarded():
    W = torch.randn(8, 32)
    x_mean = torch.rand(32)
    x_mean[0] = 0.0
    x_mean[1] = float("inf")
    x_mean[2] = float("nan")
    H = torch.eye(32)
    res = search_scales([W], x_mean, hessian_loss(H, [W]), QuantScheme(4, 16, True), grid=5)
    assert torch.isfinite(res.scales).all() and (res.scales > 0).all()


def test_clip_lowers_output_error_and_never_rounds():
    g, W, X = norm_linear_pair(seed=2)
    H = 2 * X.T @ X / X.shape[0]
    scheme = QuantScheme(3, 32, True)
    W = W.clone()
    W[0, 0] = 3.0  # one large weight: clipping it helps the rest of its group
    clipped, factors = clip_weight(W, H, scheme, grid=20, max_shrink=0.5)
    assert factors.shape == (64, 4) and factors.min() >= 0.5 and factors.max() == 1.0
    assert (clipped.abs() <= W.abs() + 1e-7).all()
    assert not torch.equal(clipped, rtn_quantize(clipped, scheme).dequantize())  # not rounded
    before = output_error(W, rtn_quantize(W, scheme).dequantize(), H)
    after = output_error(W, rtn_quantize(clipped, scheme).dequantize(), H)
    assert after < 0.95 * before


def test_gptq_scoring_never_loses_to_gptq_alone():
    g, W, X = norm_linear_pair(seed=3)
    Xg = X * g
    H = 2 * Xg.T @ Xg / Xg.shape[0]
    scheme = QuantScheme(3, 32, True)
    loss = hessian_loss(H, [W])
    first = search_scales([W], Xg.abs().mean(0), loss, scheme, duo=False)
    assert first.alpha > 0
    res = refine_for_gptq([W], Xg.abs().mean(0), H, loss, scheme, first)
    # the first candidate is GPTQ of the unscaled weight, as the gptq step alone computes it
    c = GPTQConfig(bits=3, group_size=32)
    alone = gptq_quantize(W, H, scheme, act_order=c.act_order, damp=c.damp,
                          clip=c.clip_search).dequantize()
    assert res.losses[0] == pytest.approx(loss([alone]), rel=1e-4)
    assert len(res.losses) == 5 and min(res.losses) <= res.losses[0]
    assert res.alpha in {f * first.alpha for f in (0, 0.25, 0.5, 0.75, 1)}
    Wq = gptq_scaled(W, expand_tied(res.scales, None), H, scheme)
    assert loss([Wq]) == pytest.approx(min(res.losses), rel=1e-4)
    # GPTQ leaves less for scales to win than RTN does: its best is far below RTN's best
    assert min(res.losses) < 0.8 * min(first.losses)


def test_fake_quant_scaled_is_rtn_of_the_scaled_weight():
    W = torch.randn(16, 64)
    s = torch.rand(64) + 0.5
    scheme = QuantScheme(4, 32, True)
    ref = rtn_quantize(W * s, scheme).dequantize() / s
    torch.testing.assert_close(fake_quant_scaled(W, s, scheme), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_scaling_maps_preserve_the_function(arch):
    """Random positive scales moved through every pair of every block: same logits (fp32)."""
    x = calib_ids(3, 20)
    model = tiny_model(arch)
    ref = model(x).logits
    adapter = models.get_adapter(model.config)
    gen = torch.Generator().manual_seed(0)
    tied = []
    for block in adapter.get_blocks(model):
        for pair in adapter.scale_pairs:
            tie = head_tie(block, pair)
            tied.append(tie is not None)
            prev = block.get_submodule(pair.prev)
            n = prev.out_features if isinstance(prev, torch.nn.Linear) else prev.weight.numel()
            s = torch.exp(torch.randn(n, generator=gen))
            s_in = apply_scales(block, pair, s, adapter.norm_offset, tie)
            assert s_in.numel() == block.get_submodule(pair.linears[0]).in_features
    torch.testing.assert_close(model(x).logits, ref, rtol=1e-4, atol=1e-4)
    # The tiny configs have 4 query heads on 2 KV heads (OPT has no grouped-query attention).
    assert any(tied) == (arch != "opt")


def test_tied_scales_repeat_per_kv_head():
    s = torch.arange(6.0)  # 2 KV heads of head_dim 3
    assert expand_tied(s, (2, 3)).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]


def awq_recipe(*steps: dict, batch: int = 3, dtype: str = "float32") -> dict:
    return {"steps": list(steps), "walker": {"batch_size": batch, "dtype": dtype}}


AWQ = {"method": "awq", "args": {"bits": 3, "group_size": 32, "search_samples": 6}}
GPTQ = {"method": "gptq", "args": {"bits": 3, "group_size": 32}}


def outlier_model(arch: str = "llama"):
    """A tiny model whose norms give a few channels 20x larger activations, as trained LLMs
    have: what AWQ is for."""
    model = tiny_model(arch)
    for block in models.get_adapter(model.config).get_blocks(model):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            block.get_submodule(norm).weight.data[[3, 40]] *= 20.0
    return model


def kl_to(model, ref_logp, x) -> float:
    return torch.nn.functional.kl_div(model(x).logits.log_softmax(-1), ref_logp,
                                      log_target=True, reduction="batchmean").item()


def test_awq_alone_adds_rtn_and_beats_rtn():
    x = calib_ids(12, 32)
    ref = outlier_model()(x).logits.log_softmax(-1)
    awq, rep = llmc.compress(outlier_model(), awq_recipe(AWQ), calibration=x, progress=False)
    assert [s["method"] for s in rep.recipe["steps"]] == ["awq", "rtn"]
    assert rep.recipe["steps"][1]["args"]["bits"] == 3
    rtn, _ = llmc.compress(outlier_model(), {"steps": [{"method": "rtn", "args": GPTQ["args"]}]},
                           progress=False)
    assert kl_to(awq, ref, x) < 0.9 * kl_to(rtn, ref, x)
    record = rep.transforms[0]
    assert record["method"] == "awq" and len(record["pairs"]) == 4
    assert len(record["search_windows"]) == 6
    assert any(p["tied_heads"] for p in record["pairs"])
    for name, m in awq.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            assert torch.equal(m.weight, m.llmc_quant.codes(m.weight).dequantize())


def test_awq_then_gptq_in_one_walk_is_no_worse_than_either():
    x = calib_ids(12, 32)
    ref = outlier_model()(x).logits.log_softmax(-1)
    kls = {}
    for name, steps in {"awq": [AWQ], "gptq": [GPTQ], "awq+gptq": [AWQ, GPTQ]}.items():
        model, rep = llmc.compress(outlier_model(), awq_recipe(*steps), calibration=x,
                                   progress=False)
        kls[name] = kl_to(model, ref, x)
        if name == "awq+gptq":
            assert [s["method"] for s in rep.recipe["steps"]] == ["awq", "gptq"]
            awq_args = rep.recipe["steps"][0]["args"]
            assert awq_args["clip"] is False  # GPTQ clips itself
            assert awq_args["search"] == "gptq"  # and scores the scales
            pairs = [p for t in rep.transforms for p in t["pairs"]]
            assert all(p["loss_gptq"] <= p["loss_gptq_unscaled"] for p in pairs)
            assert len(rep.blocks) == 2 and len(rep.transforms) == 2  # one walk
    assert kls["awq+gptq"] <= min(kls["awq"], kls["gptq"]), kls


def test_awq_bf16_walk_on_every_architecture():
    for arch in ARCHS:
        x = calib_ids(7, 24)
        model, rep = llmc.compress(tiny_model(arch), awq_recipe(AWQ, dtype="bfloat16"),
                                   calibration=x, progress=False)
        assert len(rep.transforms) == 2 and len(rep.layers) > 0, arch


def test_recipe_rules():
    with pytest.raises(ValueError, match=r"steps\[1\]\.args: gptq quantizes with .*bits': 4"):
        Recipe.from_dict({"steps": [AWQ, {"method": "gptq", "args": {"bits": 4,
                                                                     "group_size": 32}}]})
    with pytest.raises(ValueError, match="clip_max_shrink"):
        AWQConfig(clip_max_shrink=1.0)
    with pytest.raises(ValueError, match="search: 'sgd' is not one of rtn, gptq"):
        AWQConfig(search="sgd")
    r = Recipe.from_dict({"steps": [AWQ]})
    assert [s.method for s in r.steps] == ["awq", "rtn"]
    assert r.steps[0].config.search == "rtn" and r.steps[0].config.clip
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()  # saved recipes re-load
    # before gptq: no clipping and GPTQ-scored scales, unless the args say otherwise
    r = Recipe.from_dict({"steps": [AWQ, GPTQ]})
    assert (r.steps[0].config.search, r.steps[0].config.clip) == ("gptq", False)
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()
    own = {**AWQ, "args": {**AWQ["args"], "search": "rtn", "clip": True}}
    r = Recipe.from_dict({"steps": [own, GPTQ]})
    assert (r.steps[0].config.search, r.steps[0].config.clip) == ("rtn", True)


def test_architecture_without_a_map_fails_before_calibration(monkeypatch):
    monkeypatch.setitem(models.OVERRIDES, "llama",
                        lambda a: dataclasses.replace(a, scale_pairs=()))

    def no_data(*a, **k):
        raise AssertionError("calibration data was read")

    monkeypatch.setattr(llmc.api, "calibration_windows", no_data)
    with pytest.raises(ValueError, match="no scaling map for architecture 'llama'"):
        llmc.compress(tiny_model("llama"), {"steps": [AWQ]}, tokenizer=object(),
                      progress=False)


def test_post_norm_and_gelu_opt_keep_only_the_pairs_that_hold():
    """Post-norm OPT's layer norms feed the residual too, and GELU does not commute with
    scales: discovery refuses those pairs, with the reason, and keeps the exact ones."""
    cfg = tiny_config("opt")
    cfg.do_layer_norm_before = False
    a = models.get_adapter(cfg)
    assert [p.prev for p in a.scale_pairs] == ["self_attn.v_proj", "fc1"]
    assert any(r.prev == "self_attn_layer_norm" and "changed the block's output" in r.reason
               for r in a.refused)
    cfg = tiny_config("opt")
    cfg.activation_function = "gelu"
    a = models.get_adapter(cfg)
    assert "fc1" not in [p.prev for p in a.scale_pairs]
    assert any(r.prev == "fc1" for r in a.refused)
