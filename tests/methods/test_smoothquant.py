"""SmoothQuant: the scales keep the model's function, and they help 8-bit activations."""

from __future__ import annotations

import pytest
import torch
from conftest import calib_ids, tiny_model

import llmc
from llmc.methods.smoothquant import SmoothQuantConfig, smooth_scales

W8A8 = {"bits": 8, "group_size": -1, "act_bits": 8, "act_type": "int"}


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # gemma: 1 + w norms
def test_smoothing_alone_keeps_the_function(arch):
    x = calib_ids(2, 16)
    ref = logits(tiny_model(arch), x)
    model, report = llmc.compress(tiny_model(arch), {"steps": [{"method": "smoothquant"}]},
                                  calibration=calib_ids(), progress=False)
    torch.testing.assert_close(logits(model, x), ref, rtol=0, atol=1e-4)
    pairs = [p for t in report.transforms for p in t["pairs"]]
    assert len(pairs) == 4  # two norms per block, two blocks
    assert all(p["scale_max"] > p["scale_min"] > 0 for p in pairs)
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, tiny_model(arch).model.layers[0].input_layernorm.weight)


def test_scales_follow_the_formula():
    x_max = torch.tensor([4.0, 1.0, 0.0, 9.0])
    W = torch.tensor([[1.0, 2.0, 3.0, 0.5], [-2.0, 1.0, 1.0, 0.25]])
    s = smooth_scales(x_max, [W], 0.5)
    want = torch.tensor([(4 / 2) ** 0.5, (1 / 2) ** 0.5, 1.0, (9 / 0.5) ** 0.5])
    torch.testing.assert_close(s, want)


def outlier_model():
    """A tiny llama whose normed inputs carry an outlier channel, as real LLMs' do."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[5] = 60.0
                norm.weight[17] = -30.0
    return model


def test_smoothing_helps_8_bit_activations():
    x = calib_ids(4, 32, seed=3)
    ref = logits(outlier_model(), x)

    def error(steps):
        m, _ = llmc.compress(outlier_model(), {"steps": steps}, calibration=calib_ids(),
                             progress=False)
        return float((logits(m, x) - ref).pow(2).mean())

    plain = error([{"method": "rtn", "args": W8A8}])
    smoothed = error([{"method": "smoothquant", "args": {"alpha": 0.5}},
                      {"method": "rtn", "args": W8A8}])
    assert smoothed < 0.5 * plain


@pytest.mark.parametrize("kw, match", [({"alpha": 1.5}, "alpha"), ({"pairs": "some"}, "pairs")])
def test_bad_arguments_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SmoothQuantConfig(**kw)
