"""AWQ GEMM layout: the interleaved nibble order, bit-exact round trips, refusals, and whole
models through the CLI and ``llmc.load``."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import calib_flags, run

import llmc
from llmc.core.scheme import QuantizedWeight
from llmc.formats.awq import _pack, _unpack, awq_tensors, read_awq_tensors


def make_qw(N: int = 24, K: int = 64, group_size: int = 32, sym: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    G = K // group_size
    if sym:
        zeros = torch.full((N, G), 8, dtype=torch.int32)
    else:
        zeros = torch.randint(0, 16, (N, G), generator=g, dtype=torch.int32)
        zeros[0, 0], zeros[1, 0] = 0, 15
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    q[0, :8] = 15  # a word with its top nibble set: a negative int32
    scales = (torch.rand(N, G, generator=g) * 0.1 + 1e-3).half().float()
    return QuantizedWeight(q=q, scales=scales, zeros=zeros,
                           g_idx=(torch.arange(K) // group_size).to(torch.int32), bits=4,
                           group_size=group_size, sym=sym)


def test_nibble_order_is_interleaved():
    codes = torch.arange(8).reshape(1, 8)  # channel j holds code j
    word = _pack(codes)
    assert word.dtype == torch.int32 and word.shape == (1, 1)
    assert int(word) == 0x75316420  # nibbles hold channels 0, 2, 4, 6, 1, 3, 5, 7
    assert int(_pack(torch.full((1, 8), 15))) == -1
    assert torch.equal(_unpack(word, 8), codes)


@pytest.mark.parametrize("sym", [True, False])
def test_tensor_round_trip_is_bit_exact(sym):
    qw = make_qw(sym=sym)
    bias = torch.randn(24)
    t = awq_tensors("layer", qw, bias)
    assert t["layer.qweight"].shape == (64, 3) and t["layer.qzeros"].shape == (2, 3)
    assert t["layer.scales"].shape == (2, 24) and t["layer.scales"].dtype == torch.float16
    back = read_awq_tensors(t, "layer", 32, 64, 24)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales) and torch.equal(back.g_idx, qw.g_idx)
    assert back.sym == sym and torch.equal(t["layer.bias"], bias)
    # The stored zeros are the zeros themselves (no GPTQ-style minus one).
    assert torch.equal(_unpack(t["layer.qzeros"], 24).t().to(torch.int32), qw.zeros)


def test_refusals_name_the_reason():
    with pytest.raises(ValueError, match="4-bit AWQ only"):
        awq_tensors("x", QuantizedWeight(**{**vars(make_qw()), "bits": 3}))
    with pytest.raises(ValueError, match="does not divide in_features"):
        awq_tensors("x", QuantizedWeight(**{**vars(make_qw(K=48, group_size=32)),
                                            "g_idx": torch.arange(48) // 32,
                                            "scales": torch.ones(24, 2),
                                            "zeros": torch.ones(24, 2, dtype=torch.int32)}))
    perm = make_qw()
    perm.g_idx = perm.g_idx.flip(0)
    with pytest.raises(ValueError, match="no g_idx"):
        awq_tensors("x", perm)
    with pytest.raises(ValueError, match="multiple of 8"):
        awq_tensors("x", make_qw(N=20))


def test_cli_awq_checkpoint_loads_back_exactly(model_dir, text_file, tmp_path):
    out = tmp_path / "awq"
    run("quantize", model_dir, "--method", "awq", "--bits", 4, "--group-size", 32,
        *calib_flags(text_file), "-o", out)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg == {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm",
                    "zero_point": True, "modules_to_not_convert": None}
    report = json.loads((out / "llmc_report.json").read_text())
    assert report["transforms"][0]["method"] == "awq"
    model, tok = llmc.load(out)
    down = model.model.layers[0].mlp.down_proj
    assert down.llmc_quant.bits == 4 and down.llmc_quant.sym
    again = tmp_path / "again"
    llmc.save(model, again)  # the recipe says awq: written as AWQ again
    m2, _ = llmc.load(again)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(x).logits, m2(x).logits)
    for (n, a), b in zip(model.named_modules(), m2.modules()):
        if hasattr(a, "llmc_quant"):
            assert torch.equal(a.weight, b.weight), n
    # the same AWQ-scaled weights in the GPTQ layout, read back identically
    as_gptq = tmp_path / "as-gptq"
    llmc.save(model, as_gptq, format="gptq")
    m3, _ = llmc.load(as_gptq)
    assert torch.equal(model(x).logits, m3(x).logits)


def test_cli_awq_format_refusals_come_before_loading(model_dir, text_file, tmp_path,
                                                    monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("llmc.models.load_model", boom)
    res = run("quantize", model_dir, "--method", "awq", "--bits", 3, "--format", "awq",
              "-o", tmp_path / "o", ok=False)
    assert "4-bit AWQ only" in res.output and "--format gptq" in res.output
    res = run("quantize", model_dir, "--method", "gptq", "--act-order", "dynamic",
              "--format", "awq", "-o", tmp_path / "o", ok=False)
    assert "dynamic act-order" in res.output


def test_cli_awq_plus_gptq_writes_one_walk(model_dir, text_file, tmp_path):
    out = tmp_path / "ag"
    run("quantize", model_dir, "--method", "awq+gptq", "--bits", 3, "--group-size", 32,
        *calib_flags(text_file), "-o", out)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == 3  # 3-bit: the GPTQ layout
    recipe = llmc.Recipe.from_yaml(out / "recipe.yaml")
    assert [s.method for s in recipe.steps] == ["awq", "gptq"]
