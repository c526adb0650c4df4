"""The FP8 KV cache: keys and values quantized on static scales calibrated in the walk, the
scales in a compressed-tensors checkpoint (``kv_cache_scheme``, ``k_scale``/``v_scale``), and
the package's own fake-quantization of them."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import calib_ids, tiny_model

import llmc
from llmc.core.act import FP8_MAX, KVCacheScheme, fake_quantize_act
from llmc.models import kvcache

has_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                            reason="pip install compressed-tensors")
W4 = {"method": "rtn", "args": {"bits": 4, "group_size": 32}}


def compressed(arch="llama", strategy="tensor", steps=(W4,)):
    recipe = {"steps": list(steps), "kv_cache": {"strategy": strategy},
              "walker": {"dtype": "float32"}}  # the forwards the model's own are
    model, _ = llmc.compress(tiny_model(arch), recipe, calibration=calib_ids(), progress=False)
    return model


def without_kv(model):
    """The model's logits with its KV cache left unquantized."""
    mods = kvcache.attention_modules(model).values()
    saved = [m.llmc_kv_scales for m in mods]
    for m in mods:
        m.llmc_kv_scales = None
    try:
        with torch.no_grad():
            return model(calib_ids(2)).logits
    finally:
        for m, s in zip(mods, saved):
            m.llmc_kv_scales = s


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt", "phi3", "qwen3_moe"])
@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_scales_are_the_calibrated_maxima(arch, strategy):
    """Each attention module's scales are max|k| / 448 and max|v| / 448 of its keys and values
    on the calibration windows (per tensor or per KV head), and they change the logits."""
    model = compressed(arch, strategy)
    mods = kvcache.attention_modules(model)
    assert len(mods) == model.config.num_hidden_layers
    ranges = kvcache.KVRanges()
    for m in mods.values():
        m.saved, m.llmc_kv_scales = m.llmc_kv_scales, None
    with torch.no_grad(), kvcache.observing(ranges):
        model(calib_ids())  # the walk's windows, in one batch
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    for name, m in mods.items():
        k_amax, v_amax = ranges.amax[name]
        shape = (1,) if strategy == "tensor" else (heads, 1, 1)
        for got, amax in zip(m.saved, (k_amax, v_amax)):
            assert got.shape == shape
            want = amax.amax() if strategy == "tensor" else amax
            torch.testing.assert_close(got.reshape(-1), (want / FP8_MAX).reshape(-1),
                                       rtol=1e-3, atol=0)  # another batching
        m.llmc_kv_scales = m.saved
    with torch.no_grad():
        quantized = model(calib_ids(2)).logits
    assert not torch.equal(quantized, without_kv(model))
    torch.testing.assert_close(quantized, without_kv(model), rtol=0.1, atol=0.1)


def test_round_trip_and_config(tmp_path):
    model = compressed(strategy="attn_head")
    out = llmc.save(model, tmp_path / "kv", format="compressed-tensors")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["kv_cache_scheme"]["strategy"] == "attn_head"
    assert q["kv_cache_scheme"]["type"] == "float" and q["kv_cache_scheme"]["dynamic"] is False
    back, _ = llmc.load(out)
    for (name, a), b in zip(kvcache.attention_modules(model).items(),
                            kvcache.attention_modules(back).values()):
        assert torch.equal(a.llmc_kv_scales[0], b.llmc_kv_scales[0]), name
        assert torch.equal(a.llmc_kv_scales[1], b.llmc_kv_scales[1]), name
    with torch.no_grad():
        assert torch.equal(model(calib_ids(2)).logits, back(calib_ids(2)).logits)


def test_weight_only_layouts_and_unreadable_architectures_are_refused(tmp_path):
    recipe = {"steps": [W4], "kv_cache": {}}
    with pytest.raises(ValueError, match="use --format compressed-tensors"):
        llmc.save(compressed(), tmp_path / "g", format="gptq")
    with pytest.raises(ValueError, match="cannot be quantized"):
        llmc.compress(tiny_model("gpt_neox"), recipe, calibration=calib_ids(), progress=False)
    with pytest.raises(ValueError, match="kv_cache.strategy"):
        llmc.Recipe.from_dict({"steps": [W4], "kv_cache": {"strategy": "token"}})
    with pytest.raises(ValueError, match="unknown"):
        llmc.Recipe.from_dict({"steps": [W4], "kv_cache": {"bits": 8, "scale": 1}})


@has_ct
@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_quantization_is_the_packages(strategy):
    """compressed-tensors' fake-quantization of keys [B, H, S, D] on the scheme it reads from
    the config equals llmc's."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    scheme = KVCacheScheme(strategy=strategy)
    x = torch.randn(2, 3, 7, 16) * torch.tensor([1.0, 30.0, 0.01]).reshape(1, 3, 1, 1)
    scale = scheme.scale(x.abs().amax(dim=(0, 2, 3)))
    args = QuantizationArgs(**scheme.to_ct())
    theirs = fake_quantize(x, scale, torch.zeros_like(scale), args)
    assert torch.equal(fake_quantize_act(x, scheme.act, scale), theirs)


@has_ct
def test_transformers_loads_the_checkpoint(tmp_path):
    """transformers loads the checkpoint through compressed-tensors; with transformers 5 the
    package (0.20) does not hook the cache (the attention's ``past_key_values`` argument became
    ``cache``, which its detection does not know), so its logits are llmc's with the KV cache
    unquantized, the weights quantized the same."""
    from transformers import AutoModelForCausalLM

    model = compressed()
    out = llmc.save(model, tmp_path / "kv", format="compressed-tensors")
    tf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        theirs = tf(calib_ids(2)).logits
    if getattr(tf.model.layers[0].self_attn, "k_scale", None) is None:
        torch.testing.assert_close(theirs, without_kv(model), rtol=1e-5, atol=1e-5)
    else:  # a version that quantizes the cache
        with torch.no_grad():
            torch.testing.assert_close(theirs, model(calib_ids(2)).logits, rtol=1e-5, atol=1e-5)
