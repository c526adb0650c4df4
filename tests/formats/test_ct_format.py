"""The compressed-tensors checkpoint: bit-exact round trips, the package's own packing, and
transformers loading it through the compressed-tensors package on CPU with the same logits."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import calib_ids, tiny_model

import llmc
from llmc.checks import check_model
from llmc.core.masks import nm_keep
from llmc.core.scheme import QuantScheme
from llmc.formats.compressed_tensors import bitmask_tensors, ct_tensors, read_bitmask_tensors
from llmc.methods.rtn import rtn_quantize

has_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                            reason="pip install compressed-tensors")


def compressed(steps):
    model, _ = llmc.compress(tiny_model("llama"), {"steps": steps}, calibration=calib_ids(),
                             progress=False)
    return model


def linears_equal(a, b):
    for (n, x), y in zip(a.named_modules(), b.modules()):
        if isinstance(x, torch.nn.Linear):
            assert torch.equal(x.weight, y.weight), n
            if hasattr(x, "llmc_quant"):
                assert torch.equal(x.llmc_quant.codes(x.weight).q, y.llmc_quant.codes(y.weight).q)


SCHEMES = {
    "w4g32-sym": [{"method": "gptq", "args": {"bits": 4, "group_size": 32}}],
    "w4g32-asym": [{"method": "gptq", "args": {"bits": 4, "group_size": 32, "sym": False}}],
    "w3g32-sym": [{"method": "gptq", "args": {"bits": 3, "group_size": 32}}],
    "w8-channel-asym": [{"method": "rtn", "args": {"bits": 8, "group_size": -1, "sym": False}}],
    "w2g32-sym": [{"method": "rtn", "args": {"bits": 2, "group_size": 32}}],
    "24": [{"method": "wanda", "args": {"pattern": "2:4"}}],
    "24-w4": [{"method": "sparsegpt", "args": {"pattern": "2:4", "bits": 4, "group_size": 32}}],
}


@pytest.mark.parametrize("case", list(SCHEMES))
def test_round_trip_is_bit_exact(tmp_path, case):
    model = compressed(SCHEMES[case])
    out = llmc.save(model, tmp_path / case, format="compressed-tensors")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["quantization_status"] == "compressed"
    if case == "24":
        assert q["format"] == "dense" and q["config_groups"] == {}
        assert q["sparsity_config"]["format"] == "sparse-24-bitmask"
    else:
        assert q["format"] == "pack-quantized" and q["ignore"] == ["lm_head"]
    if case == "24-w4":
        assert q["sparsity_config"]["format"] == "dense"
        assert q["sparsity_config"]["sparsity_structure"] == "2:4"
    back, _ = llmc.load(out)
    linears_equal(model, back)


@has_ct
@pytest.mark.parametrize("bits,sym", [(4, True), (3, False), (8, False), (2, True)])
def test_packing_is_the_packages(bits, sym):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qw = rtn_quantize(torch.randn(40, 75), QuantScheme(bits, 25, sym))  # odd widths
    t = ct_tensors("m", qw, None)
    offset = 2 ** (bits - 1)
    signed = (qw.q.to(torch.int32) - offset).to(torch.int8)
    assert torch.equal(t["m.weight_packed"], pack_to_int32(signed, bits))
    assert t["m.weight_scale"].shape == (40, 3) and t["m.weight_shape"].tolist() == [40, 75]
    if not sym:
        zp = (qw.zeros.to(torch.int32) - offset).to(torch.int8)
        assert torch.equal(t["m.weight_zero_point"], pack_to_int32(zp, bits, packed_dim=0))
    else:
        assert "m.weight_zero_point" not in t


@has_ct
def test_bitmask_is_the_packages():
    from compressed_tensors.utils.helpers import unpack_bitmasks

    W = torch.randn(8, 40)
    W = W * nm_keep(W.abs(), 2, 4)
    W[0, :4] = 0
    t = bitmask_tensors("m", W)
    keep = unpack_bitmasks(t["m.weight.bitmask"], [8, 40])
    assert (keep.reshape(8, 10, 4).sum(-1) == 2).all()
    assert torch.equal(W[keep].reshape(8, 20), t["m.weight.compressed"])
    assert torch.equal(read_bitmask_tensors(t, "m"), W)


@has_ct
@pytest.mark.parametrize("case", ["w4g32-sym", "w3g32-sym", "w2g32-sym", "24-w4"])
def test_transformers_loads_it_with_the_same_logits(tmp_path, case):
    from transformers import AutoModelForCausalLM

    model = compressed(SCHEMES[case])
    out = llmc.save(model, tmp_path / case, format="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = calib_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_ragged_groups_are_refused(tmp_path):
    model = compressed([{"method": "rtn", "args": {"bits": 4, "group_size": 48}}])
    with pytest.raises(ValueError, match="whole groups"):
        llmc.save(model, tmp_path / "r", format="compressed-tensors")
    assert not (tmp_path / "r").exists()
    recipe = llmc.Recipe.from_dict({"steps": [{"method": "rtn", "args": {"group_size": 48}}]})
    with pytest.raises(ValueError, match="does not divide the input width 128 of .*down_proj"):
        check_model(recipe, tiny_model().config, divisible_groups="compressed-tensors")
    check_model(recipe, tiny_model().config)  # the GPTQ layout holds a narrow last group


def test_dynamic_act_order_is_refused(tmp_path):
    model = compressed([{"method": "gptq", "args": {"bits": 4, "group_size": 32,
                                                    "act_order": "dynamic"}}])
    with pytest.raises(ValueError, match="static act-order, or --format gptq"):
        llmc.save(model, tmp_path / "d", format="compressed-tensors")
    assert not (tmp_path / "d").exists()


FP8 = {"bits": 8, "group_size": -1, "type": "float", "act_bits": 8, "act_type": "float"}
W8A8 = {"bits": 8, "group_size": -1, "act_bits": 8, "act_type": "int"}
STATIC = {"act_strategy": "tensor", "act_dynamic": False}
W8A8_SCHEMES = {
    "fp8-dynamic": ([{"method": "rtn", "args": FP8}], "float-quantized", torch.float8_e4m3fn),
    "fp8-gptq": ([{"method": "gptq", "args": FP8}], "float-quantized", torch.float8_e4m3fn),
    "w8a8-sq-gptq": ([{"method": "smoothquant"}, {"method": "gptq", "args": W8A8}],
                     "int-quantized", torch.int8),
    "fp8-static-gptq": ([{"method": "gptq", "args": {**FP8, **STATIC}}], "float-quantized",
                        torch.float8_e4m3fn),
    "w8a8-static-rtn": ([{"method": "rtn", "args": {**W8A8, **STATIC}}], "int-quantized",
                        torch.int8),
}


@pytest.mark.parametrize("case", list(W8A8_SCHEMES))
def test_w8a8_round_trip_is_bit_exact(tmp_path, case):
    steps, fmt, dtype = W8A8_SCHEMES[case]
    model = compressed(steps)
    out = llmc.save(model, tmp_path / case)  # compressed-tensors by default for these
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    group = q["config_groups"]["group_0"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == group["format"] == fmt
    acts = group["input_activations"]
    static = "static" in case
    assert acts["strategy"] == ("tensor" if static else "token") and acts["num_bits"] == 8
    assert acts["dynamic"] is not static
    assert acts["type"] == ("float" if "fp8" in case else "int")
    assert group["weights"]["strategy"] == "channel"
    from conftest import output_tensors
    t = output_tensors(out)
    w = t["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == dtype and w.shape == (64, 64)
    assert t["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 1)
    if static:  # the calibrated scale of each Linear's input
        scale = t["model.layers.0.self_attn.q_proj.input_scale"]
        assert scale.shape == (1,) and scale.dtype == torch.float32 and scale.item() > 0
        assert torch.equal(scale, model.model.layers[0].self_attn.q_proj.llmc_act_scale)
    else:
        assert "model.layers.0.self_attn.q_proj.input_scale" not in t
    back, _ = llmc.load(out)
    linears_equal(model, back)
    down = (back.model.layers[1].mlp.down_proj, model.model.layers[1].mlp.down_proj)
    assert down[0].llmc_act == down[1].llmc_act
    x = calib_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


MIXED = [{"method": "gptq", "targets": ["re:.*self_attn.*"], "args": FP8},
         {"method": "gptq", "targets": ["re:.*mlp.*"], "args": {"bits": 4, "group_size": 32}}]
BLOCK = {**FP8, "group_size": 32, "block_rows": 32}  # the tiny model's widths: 32 x 32 blocks
EXACT = {**{k: v[0] for k, v in W8A8_SCHEMES.items()},
         "fp8-block": [{"method": "gptq", "args": BLOCK}],
         "mixed-fp8-attention-w4-mlp": MIXED}


@has_ct
@pytest.mark.parametrize("case", list(EXACT))
def test_transformers_runs_w8a8_like_llmc(tmp_path, case, monkeypatch):
    """transformers (through the compressed-tensors package) quantizes the activations in the
    forward on the CPU too. Its INT8 reference divides each token's amax by 127.5 where vLLM's
    kernel, and llmc, divide by 127: with llmc set to the package's constant the logits agree.
    Static scales are the checkpoint's, which both use as they are. FP8 128 x 128 blocks (32 x
    32 here) and mixed precision (FP8 attention, 4-bit MLPs: two config groups) too."""
    from transformers import AutoModelForCausalLM

    from llmc.core import act

    if "fp8" not in case and "static" not in case:
        monkeypatch.setattr(act, "INT8_MAX", 127.5)
    model = compressed(EXACT[case])
    out = llmc.save(model, tmp_path / case)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = calib_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_weight_only_formats_refuse_w8a8(tmp_path, fmt):
    recipe = llmc.Recipe.from_dict({"steps": [{"method": "rtn", "args": FP8}]})
    from llmc.formats.checkpoint import check_writable
    with pytest.raises(ValueError, match="use --format compressed-tensors"):
        check_writable(recipe, fmt)
    model = compressed([{"method": "rtn", "args": W8A8}])
    with pytest.raises(ValueError, match="use --format compressed-tensors"):
        llmc.save(model, tmp_path / fmt, format=fmt)
    assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("args", [W8A8, FP8], ids=["int8", "fp8"])
def test_w8a8_checkpoints_load_packed_with_8bit_matmuls(tmp_path, args):
    """``packed=True`` gives W8A8Linear modules (real INT8 / FP8 matmuls on the per-token
    quantized inputs) whose logits are the fake-quantized model's up to accumulation order;
    schemes it does not run (static scales) are refused."""
    from llmc.nn import W8A8Linear

    model = compressed([{"method": "rtn", "args": args}])
    out = llmc.save(model, tmp_path / "w8a8")
    packed, _ = llmc.load(out, packed=True)
    assert isinstance(packed.model.layers[0].self_attn.q_proj, W8A8Linear)
    x = calib_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(packed(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)
    static = llmc.save(compressed([{"method": "rtn", "args": {**args, **STATIC}}]),
                       tmp_path / "static")
    with pytest.raises(ValueError, match="packed=False"):
        llmc.load(static, packed=True)


NVFP4 = {"bits": 4, "group_size": 16, "type": "float"}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nvfp4_round_trip_is_bit_exact(tmp_path, method):
    model = compressed([{"method": method, "args": NVFP4}])
    W = model.model.layers[0].mlp.down_proj.weight
    st = model.model.layers[0].mlp.down_proj.llmc_quant
    assert st.type == "float" and st.bits == 4 and st.global_scale > 0
    assert set((W / st.scales.repeat_interleave(16, dim=1)).abs().unique().tolist()) <= {
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
    out = llmc.save(model, tmp_path / method)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    w = q["config_groups"]["group_0"]["weights"]
    assert q["format"] == "nvfp4-pack-quantized"
    assert (w["strategy"], w["group_size"], w["type"], w["num_bits"]) == ("tensor_group", 16,
                                                                          "float", 4)
    from conftest import output_tensors
    t = output_tensors(out)
    p = "model.layers.0.mlp.down_proj"
    assert t[f"{p}.weight_packed"].dtype == torch.uint8
    assert t[f"{p}.weight_packed"].shape == (64, 64)  # [N, K / 2], K = 128
    assert t[f"{p}.weight_scale"].dtype == torch.float8_e4m3fn
    assert t[f"{p}.weight_scale"].shape == (64, 8)
    back, _ = llmc.load(out)
    linears_equal(model, back)


@has_ct
def test_nvfp4_is_the_packages_layout(tmp_path):
    """The package's own unpacker and dequantization formula give llmc's weights."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    model = compressed([{"method": "gptq", "args": NVFP4}])
    out = llmc.save(model, tmp_path / "nv")
    from conftest import output_tensors
    t = output_tensors(out)
    for name, m in model.named_modules():
        if not hasattr(m, "llmc_quant"):
            continue
        packed = t[f"{name}.weight_packed"]
        v = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2,
                                  dtype=torch.float32)
        scale = t[f"{name}.weight_scale"].float() / t[f"{name}.weight_global_scale"]
        assert torch.equal(v * scale.repeat_interleave(16, dim=1), m.weight), name


@has_ct
@pytest.mark.parametrize("args", ["nvfp4", "nvfp4-w4a4", "mxfp4", "mxfp4-w4a4"])
def test_transformers_runs_fp4(tmp_path, args):
    """transformers keeps NVFP4 / MXFP4 compressed and runs it in bfloat16 on the CPU (their
    activations too): its logits agree with llmc's bfloat16 model to that precision (within
    twice llmc's own bfloat16-to-float32 change)."""
    from transformers import AutoModelForCausalLM

    from llmc.recipe import SCHEME_PRESETS

    model = compressed([{"method": "gptq", "args": SCHEME_PRESETS[args]}])
    out = llmc.save(model, tmp_path / "fp4")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    x = calib_ids(2, 16)
    with torch.no_grad():
        y32 = model(x).logits
        y = model.bfloat16()(x).logits.float()
        yh = hf(x).logits.float()
    assert (yh - y).abs().max() <= 2 * (y - y32).abs().max() + 1e-3


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_mixed_precision_is_one_config_group_per_scheme(tmp_path, arch):
    """FP8 W8A8 attention with W4A16 MLPs from a recipe with two steps: two config groups
    targeting their Linears (in the checkpoint's names: Mixtral's block_sparse_moe), a
    mixed-precision format, read back bit-exactly, each Linear with its own scheme."""
    model, _ = llmc.compress(tiny_model(arch), {"steps": MIXED}, calibration=calib_ids(),
                             progress=False)
    out = llmc.save(model, tmp_path / "mixed")  # compressed-tensors by default
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "mixed-precision" and q["ignore"] == ["lm_head"]
    g0, g1 = q["config_groups"]["group_0"], q["config_groups"]["group_1"]
    assert (g0["format"], g1["format"]) == ("float-quantized", "pack-quantized")
    assert g0["input_activations"]["type"] == "float" and g1["input_activations"] is None
    assert r"re:.*\.self_attn\.q_proj$" in g0["targets"]
    mlp = "block_sparse_moe" if arch == "mixtral" else "mlp"
    assert all(t.startswith(f"re:.*\\.{mlp}\\.") for t in g1["targets"])
    back, _ = llmc.load(out)
    linears_equal(model, back)
    layer = back.model.layers[1]
    assert layer.self_attn.o_proj.llmc_quant.type == "float"
    assert layer.self_attn.o_proj.llmc_act.type == "float"
    up = next(m for n, m in layer.mlp.named_modules() if n.endswith(("up_proj", "w3")))
    assert up.llmc_quant.bits == 4 and getattr(up, "llmc_act", None) is None
    x = calib_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


def test_group_targets_fall_back_to_names():
    """A name quantized with one scheme in some blocks and another in others is targeted by
    its full names."""
    from llmc.formats.compressed_tensors import group_of, group_targets

    a = ["m.layers.0.attn.q", "m.layers.0.mlp.up", "m.layers.1.attn.q"]
    b = ["m.layers.1.mlp.up"]
    ta, tb = group_targets(a, b), group_targets(b, a)
    assert ta == [r"re:.*\.attn\.q$", "m.layers.0.mlp.up"] and tb == ["m.layers.1.mlp.up"]
    groups = [(ta, "A"), (tb, "B")]
    assert [group_of(groups, n) for n in a + b] == ["A", "A", "A", "B"]
    assert group_of(groups, "m.layers.2.mlp.up") is None


W4A4 = {**NVFP4, "act_bits": 4, "act_type": "float"}


def test_nvfp4_w4a4_round_trip_is_bit_exact(tmp_path):
    """NVFP4 weights and activations: the calibrated global scale of each Linear's input is its
    ``input_global_scale``; group scales are computed in the forward (``dynamic: local``)."""
    from conftest import output_tensors

    from llmc.core.act import ActScheme

    model = compressed([{"method": "gptq", "args": W4A4}])
    out = llmc.save(model, tmp_path / "w4a4")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    acts = q["config_groups"]["group_0"]["input_activations"]
    assert (acts["num_bits"], acts["strategy"], acts["dynamic"], acts["group_size"]) == (
        4, "tensor_group", "local", 16)
    t = output_tensors(out)
    glob = t["model.layers.0.mlp.down_proj.input_global_scale"]
    down = model.model.layers[0].mlp.down_proj
    assert down.llmc_act == ActScheme("float", "tensor_group", "local", 4)
    assert glob.shape == (1,) and torch.equal(glob, down.llmc_act_scale)
    back, _ = llmc.load(out)
    linears_equal(model, back)
    x = calib_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


MXFP4 = {"bits": 4, "group_size": 32, "type": "float"}


@has_ct
def test_mxfp4_scales_are_the_packages():
    """MXFP4's power-of-two group scales and its fake-quantized weight equal the package's
    (``calculate_qparams`` with ``scale_dtype: uint8``, then ``fake_quantize``)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    from llmc.formats.compressed_tensors import _weights_args

    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(0))
    W = W * torch.logspace(-1, 1, 96)
    qw = rtn_quantize(W, QuantScheme(4, 32, True, "float"))
    args = QuantizationArgs(**_weights_args(4, 32, True, "none", "float"))
    g = W.unflatten(-1, (3, 32))
    scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
    assert torch.equal(scale.float(), qw.scales)
    assert torch.equal(fake_quantize(W, scale, zero, args), qw.dequantize())


def test_mxfp4_round_trip_is_bit_exact(tmp_path):
    from conftest import output_tensors

    model = compressed([{"method": "gptq", "args": MXFP4}])
    out = llmc.save(model, tmp_path / "mx")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    w = q["config_groups"]["group_0"]["weights"]
    assert q["format"] == "mxfp4-pack-quantized"
    assert (w["strategy"], w["group_size"], w["scale_dtype"]) == ("group", 32, "torch.uint8")
    t = output_tensors(out)
    assert t["model.layers.0.mlp.up_proj.weight_packed"].shape == (128, 32)
    scale = t["model.layers.0.mlp.up_proj.weight_scale"]
    assert scale.dtype == torch.uint8 and scale.shape == (128, 2)
    assert "model.layers.0.mlp.up_proj.weight_global_scale" not in t
    back, _ = llmc.load(out)
    linears_equal(model, back)


def test_mxfp4_w4a4_round_trip_is_bit_exact(tmp_path):
    """MXFP4 weights and activations: the inputs' scales are computed in the forward (nothing
    calibrated, nothing stored), the config group names them as the package's MXFP4 preset
    does, and the model reads back with the same logits."""
    from conftest import output_tensors

    from llmc.core.act import ActScheme, detach
    from llmc.recipe import SCHEME_PRESETS

    model = compressed([{"method": "gptq", "args": SCHEME_PRESETS["mxfp4-w4a4"]}])
    down = model.model.layers[0].mlp.down_proj
    assert down.llmc_act == ActScheme("float", "group", True, 4)
    out = llmc.save(model, tmp_path / "mx")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "mxfp4-pack-quantized"
    acts = q["config_groups"]["group_0"]["input_activations"]
    assert (acts["num_bits"], acts["type"], acts["strategy"], acts["dynamic"],
            acts["group_size"], acts["scale_dtype"]) == (4, "float", "group", True, 32,
                                                         "torch.uint8")
    t = output_tensors(out)
    assert not any(k.endswith(("input_scale", "input_global_scale")) for k in t)
    back, _ = llmc.load(out)
    linears_equal(model, back)
    assert back.model.layers[1].self_attn.o_proj.llmc_act.is_mx
    x = calib_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
        for m in back.modules():
            detach(m)
        assert not torch.equal(back(x).logits, model(x).logits)  # the inputs were quantized


def test_fp8_block_scales(tmp_path):
    """FP8 weights in blocks (``strategy: block``): one scale per 32 x 32 block, shared by the
    block's rows in memory and stored once, read back bit-exactly."""
    from conftest import output_tensors

    model = compressed([{"method": "gptq", "args": BLOCK}])
    up = model.model.layers[0].mlp.up_proj.llmc_quant.scales  # [128, 2]
    assert torch.equal(up[0], up[31]) and not torch.equal(up[31], up[32])
    out = llmc.save(model, tmp_path / "blk")
    w = json.loads((out / "config.json").read_text())["quantization_config"][
        "config_groups"]["group_0"]["weights"]
    assert (w["strategy"], w["block_structure"], w["group_size"]) == ("block", [32, 32], None)
    scale = output_tensors(out)["model.layers.0.mlp.up_proj.weight_scale"]
    assert scale.shape == (4, 2) and torch.equal(scale, up[::32])
    back, _ = llmc.load(out)
    linears_equal(model, back)


@has_ct
@pytest.mark.parametrize("kind", ["fp8-group", "nvfp4"])
def test_dynamic_activations_are_the_packages(kind):
    """The package's dynamic quantization of an input equals llmc's: FP8 with a scale per
    token and 128 inputs (``fp8-block``'s), and NVFP4's local group scales over the global
    scale llmc calibrates."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    from llmc.core.act import ActScheme, fake_quantize_act, static_scale

    nvfp4 = kind == "nvfp4"
    scheme = (ActScheme("float", "tensor_group", "local", 4) if nvfp4
              else ActScheme("float", "group", True, 8))
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(0))
    x = x * torch.logspace(-2, 1, 256)
    g = static_scale(x.abs().amax(), scheme) if nvfp4 else None
    args = QuantizationArgs(**scheme.to_ct())
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=g)
    assert torch.equal(fake_quantize(x, scale, zp, args, global_scale=g),
                       fake_quantize_act(x, scheme, g))


def test_group_activations_need_divisible_widths():
    from llmc.recipe import SCHEME_PRESETS

    recipe = llmc.Recipe.from_dict({"steps": [{"method": "rtn",
                                               "args": SCHEME_PRESETS["fp8-block"]}]})
    with pytest.raises(ValueError, match="groups of 128 need input widths divisible by 128"):
        check_model(recipe, tiny_model("llama").config)
