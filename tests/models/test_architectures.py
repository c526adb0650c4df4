"""Every architecture llmc knows, found by the code (llmc.models.structure) rather than listed:
the structure it reads, GPTQ and AWQ through the walker, the GPTQ/AWQ checkpoints loaded back
bit-exactly, and transformers loading the compressed-tensors export with the same logits."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import ARCHS, MOE_ARCHS, MORE_ARCHS, calib_ids, tiny_config, tiny_model

import llmc
from llmc.models import block_linears, get_adapter
from llmc.models.moe import unfuse_experts
from llmc.models.scaling import apply_scales, head_tie

ALL = ARCHS + MORE_ARCHS  # dense (the structure each has is listed below)
EVERY = ALL + MOE_ARCHS  # with the mixture-of-experts models (tests/models/test_moe.py)
has_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                            reason="pip install compressed-tensors")

# What each architecture's structure is expected to be, where it differs from llama's.
EXPECTED = {
    "phi3": {"groups": (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                        ("mlp.down_proj",)),
             "pairs": ["input_layernorm", "post_attention_layernorm"], "tail": "mlp.down_proj"},
    "olmo2": {"pairs": ["self_attn.v_proj", "mlp.up_proj"], "tail": None},  # no norm before
    "gemma2": {"pairs": ["input_layernorm", "self_attn.v_proj", "pre_feedforward_layernorm",
                         "mlp.up_proj"], "tail": None, "offset": 1.0},
    "gemma3_text": {"pairs": ["input_layernorm", "self_attn.v_proj",
                              "pre_feedforward_layernorm", "mlp.up_proj"], "tail": None,
                    "offset": 1.0},
    "granite": {"tail": None},  # residual_multiplier scales the MLP's output
    # attention and MLP read one norm's output: one group of five, one norm pair for all
    "cohere": {"groups": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                           "mlp.gate_proj", "mlp.up_proj"), ("self_attn.o_proj",),
                          ("mlp.down_proj",)),
               "pairs": ["input_layernorm", "self_attn.v_proj", "mlp.up_proj"]},
    "glm4": {"groups": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                        ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
             "pairs": ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm"],
             "tail": None},
    "gpt_neox": {"groups": (("attention.query_key_value",), ("attention.dense",),
                            ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
                 "pairs": ["input_layernorm", "post_attention_layernorm"], "tail": None},
    "opt": {"groups": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                       ("self_attn.out_proj",), ("fc1",), ("fc2",)),
            "pairs": ["self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"],
            "tail": None},
}
LLAMA = {"groups": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
         "pairs": ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                   "mlp.up_proj"], "tail": "mlp.down_proj", "offset": 0.0}


@pytest.mark.parametrize("arch", ALL)
def test_structure_is_found(arch):
    model = tiny_model(arch)
    a = get_adapter(model.config)
    want = {**LLAMA, **EXPECTED.get(arch, {})}
    assert a.groups == want["groups"]
    assert [p.prev for p in a.scale_pairs] == want["pairs"]
    assert a.tail == want["tail"] and a.norm_offset == want["offset"]
    blocks = a.get_blocks(model)
    assert len(blocks) == tiny_config(arch).num_hidden_layers
    assert {n for g in a.groups for n in g} == set(block_linears(blocks[0]))
    for name in (*a.embeddings, a.norm, a.head):
        model.get_submodule(name)
    assert model.get_submodule(a.head) is model.get_output_embeddings()


@pytest.mark.parametrize("arch", EVERY)
def test_scaling_pairs_keep_the_function(arch):
    """Random positive scales folded through every found pair of every block: same logits."""
    x = calib_ids(2, 12)
    model = tiny_model(arch)
    unfuse_experts(model)
    ref = model(x).logits
    a = get_adapter(model.config)
    gen = torch.Generator().manual_seed(0)
    for block in a.get_blocks(model):
        for pair in a.scale_pairs:
            prev = block.get_submodule(pair.prev)
            n = prev.out_features if isinstance(prev, torch.nn.Linear) else prev.weight.numel()
            s = torch.exp(torch.randn(n, generator=gen) * 0.5)
            apply_scales(block, pair, s, a.norm_offset, head_tie(block, pair))
    torch.testing.assert_close(model(x).logits, ref, rtol=1e-4, atol=1e-4)


def linears_equal(a, b):
    for (n, x), y in zip(a.named_modules(), b.modules()):
        if isinstance(x, torch.nn.Linear):
            assert torch.equal(x.weight, y.weight), n
            if hasattr(x, "llmc_quant"):
                assert torch.equal(x.llmc_quant.codes(x.weight).q,
                                   y.llmc_quant.codes(y.weight).q), n


RECIPES = {
    "gptq": ({"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 16}}]}, "gptq"),
    "awq": ({"steps": [{"method": "awq", "args": {"bits": 4, "group_size": 16}}]}, "awq"),
}


@has_ct
@pytest.mark.parametrize("method", list(RECIPES))
@pytest.mark.parametrize("arch", EVERY)
def test_quantize_save_and_load(tmp_path, arch, method):
    from transformers import AutoModelForCausalLM

    recipe, fmt = RECIPES[method]
    x = calib_ids(4, 16)
    model, report = llmc.compress(tiny_model(arch), recipe, calibration=x, progress=False)
    routers = get_adapter(model.config).routers  # MoE gates stay dense
    linears = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()
               and not n.endswith(routers)]
    assert sorted(r["name"] for r in report.layers) == sorted(linears)
    if method == "awq":
        assert len(report.transforms) == 2
    back, _ = llmc.load(llmc.save(model, tmp_path / fmt, format=fmt))
    linears_equal(model, back)
    out = llmc.save(model, tmp_path / "ct", format="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=0, atol=1e-4)
