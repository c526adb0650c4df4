"""HF GPTQ layout: bit-exact tensor round trips, checkpoint files, atomic output dirs."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import GPTQConfig

from llmc.core.scheme import QuantizedWeight, QuantScheme
from llmc.formats.gptq import (
    choose_checkpoint_format,
    gptq_tensors,
    quantization_config,
    ragged_groups_warning,
    read_checkpoint_tensors,
    read_gptq_tensors,
    write_gptq_checkpoint,
)
from llmc.formats.io import atomic_output_dir


def make_qw(
    N: int,
    K: int,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool = False,
    zero_extremes: bool = True,
    seed: int = 0,
) -> QuantizedWeight:
    """Random codes and qparams; asym zeros include 0 and 2^bits - 1 when ``zero_extremes``."""
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym)
    G = scheme.num_groups(K)
    maxq = scheme.maxq
    q = torch.randint(0, maxq + 1, (N, K), generator=g).to(torch.uint8)
    scales = (torch.rand(N, G, generator=g) * 0.1 + 1e-3).half().float()
    if sym:
        zeros = torch.full((N, G), (maxq + 1) // 2, dtype=torch.int32)
    else:
        low = 0 if zero_extremes else 1
        zeros = torch.randint(low, maxq + 1, (N, G), generator=g, dtype=torch.int32)
        if zero_extremes:
            zeros[0, 0], zeros[-1, -1] = 0, maxq
    g_idx = scheme.default_g_idx(K)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    return QuantizedWeight(scales, zeros, g_idx.to(torch.int32), bits, group_size, sym, q=q)


def assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert torch.equal(a.q, b.q) and a.q.dtype == b.q.dtype == torch.uint8
    assert torch.equal(a.scales, b.scales) and b.scales.dtype == torch.float32
    assert torch.equal(a.zeros, b.zeros) and b.zeros.dtype == torch.int32
    assert torch.equal(a.g_idx, b.g_idx)
    assert torch.equal(a.dequantize(), b.dequantize())


CASES = [  # N, K, bits, group_size, sym, act_order
    (96, 576, 4, 128, True, False),  # narrow last group: G = 5, last 64 wide
    (96, 576, 4, 128, False, True),
    (64, 256, 3, 64, False, False),
    (64, 256, 3, -1, True, True),
    (32, 320, 2, 32, False, False),
    (40, 192, 8, -1, False, False),
    (40, 160, 8, 64, True, True),
]


@pytest.mark.parametrize("N,K,bits,group_size,sym,act_order", CASES)
def test_tensor_round_trip(N, K, bits, group_size, sym, act_order) -> None:
    qw = make_qw(N, K, bits, group_size, sym, act_order)
    fmt = choose_checkpoint_format([qw])
    assert fmt == ("gptq" if sym else "gptq_v2")
    bias = torch.randn(N)
    t = gptq_tensors("m.proj", qw, bias, fmt)
    G = math.ceil(K / group_size) if group_size != -1 else 1
    assert t["m.proj.qweight"].shape == (math.ceil(K * bits / 32), N)
    assert t["m.proj.qzeros"].shape == (G, math.ceil(N * bits / 32))
    assert t["m.proj.scales"].shape == (G, N) and t["m.proj.scales"].dtype == torch.float16
    assert t["m.proj.g_idx"].dtype == torch.int32 and t["m.proj.bias"].dtype == bias.dtype
    assert all(v.dtype == torch.int32 for k, v in t.items() if k.endswith(("qweight", "qzeros")))
    back = read_gptq_tensors(t, "m.proj", bits, group_size, sym, fmt, K, N)
    assert_same(qw, back)


def test_v1_stores_zero_minus_one() -> None:
    qw = make_qw(8, 64, 4, 32, sym=True)
    t = gptq_tensors("p", qw)  # symmetric 4-bit: zero 8 -> stored 7 in every nibble
    assert (t["p.qzeros"] == 0x77777777).all()
    assert_same(qw, read_gptq_tensors(t, "p", 4, 32, True, "gptq", 64, 8))
    asym = make_qw(8, 64, 4, 32, sym=False, zero_extremes=False)
    assert choose_checkpoint_format([qw, asym]) == "gptq"
    assert_same(asym, read_gptq_tensors(gptq_tensors("p", asym), "p", 4, 32, False, "gptq", 64, 8))


def test_zero_of_zero_needs_v2() -> None:
    qw = make_qw(8, 64, 4, 32, sym=False)
    with pytest.raises(ValueError, match="gptq_v2"):
        gptq_tensors("p", qw, checkpoint_format="gptq")
    assert choose_checkpoint_format([make_qw(8, 64, 4, 32, True), qw]) == "gptq_v2"


def test_rejects_scales_not_fp16() -> None:
    qw = make_qw(8, 64, 4, 32, sym=True)
    qw.scales[0, 0] = 0.1  # not exactly representable in fp16
    with pytest.raises(ValueError, match="float16"):
        gptq_tensors("p", qw)


def test_quantization_config_loads_in_transformers() -> None:
    qc = quantization_config(4, 128, True, True, False, "gptq", damp_percent=0.01)
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert qc["meta"]["quantizer"][0].startswith("llmc:")
    cfg = GPTQConfig.from_dict(qc)
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.format) == (4, 128, True, "gptq")
    assert "damp_percent" not in quantization_config(4, 128, True, False)
    with pytest.raises(ValueError, match="compressed-tensors"):
        quantization_config(5, 128, True, False)


def test_ragged_groups_warning() -> None:
    msg = ragged_groups_warning("mlp.down_proj", 576, 128)
    assert msg is not None and "vLLM" in msg and "64" in msg
    assert ragged_groups_warning("x", 512, 128) is None
    assert ragged_groups_warning("x", 576, -1) is None


def _model(bits: int = 4, group_size: int = 128, sym: bool = True):
    emb = torch.randn(50, 96)
    state = {
        "model.embed_tokens.weight": emb,
        "lm_head.weight": emb,  # tied: shares storage
        "model.norm.weight": torch.ones(96),
    }
    quantized = {
        f"model.layers.{i}.mlp.down_proj": (make_qw(96, 576, bits, group_size, sym, seed=i), None)
        for i in range(3)
    }
    quantized["model.layers.0.self_attn.q_proj"] = (
        make_qw(96, 96 * 4, bits, group_size, sym, act_order=True),
        torch.randn(96),
    )
    config = {"model_type": "llama", "tie_word_embeddings": True, "hidden_size": 96}
    qc = quantization_config(bits, group_size, sym, True, checkpoint_format="gptq")
    return state, quantized, config, qc


@pytest.mark.parametrize("max_shard_bytes", [2_000_000_000, 40_000])
def test_checkpoint_round_trip(tmp_path: Path, max_shard_bytes: int, caplog) -> None:
    state, quantized, config, qc = _model()
    with caplog.at_level(logging.WARNING, logger="llmc.formats.gptq"):
        write_gptq_checkpoint(tmp_path, state, quantized, config, qc, max_shard_bytes)
    assert "vLLM cannot" in caplog.text
    index = tmp_path / "model.safetensors.index.json"
    if max_shard_bytes == 40_000:
        meta = json.loads(index.read_text())
        files = sorted(set(meta["weight_map"].values()))
        assert len(files) > 1 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
        assert meta["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in read_checkpoint_tensors(tmp_path).values()
        )
        assert not (tmp_path / "model.safetensors").exists()
    else:
        assert (tmp_path / "model.safetensors").exists() and not index.exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"] == qc and cfg["model_type"] == "llama"
    tensors = read_checkpoint_tensors(tmp_path)
    assert "lm_head.weight" not in tensors
    assert torch.equal(tensors["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    for name, (qw, bias) in quantized.items():
        N, K = qw.shape
        back = read_gptq_tensors(tensors, name, 4, 128, True, "gptq", K, N)
        assert_same(qw, back)
        if bias is not None:
            assert torch.equal(tensors[f"{name}.bias"], bias)


def test_checkpoint_untied_shared_storage_is_cloned(tmp_path: Path) -> None:
    state, _, config, qc = _model()
    config["tie_word_embeddings"] = False
    write_gptq_checkpoint(tmp_path, state, {}, config, qc)
    tensors = read_checkpoint_tensors(tmp_path)
    assert torch.equal(tensors["lm_head.weight"], state["lm_head.weight"])


def test_checkpoint_rejects_mismatched_scheme(tmp_path: Path) -> None:
    state, quantized, config, _ = _model()
    qc = quantization_config(4, 64, True, False)
    with pytest.raises(ValueError, match="group_size"):
        write_gptq_checkpoint(tmp_path, state, quantized, config, qc)


def test_atomic_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_output_dir(out, overwrite=False) as d:
        assert d.parent == tmp_path and d.name.startswith(".out.tmp-")
        (d / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(ValueError, match="--overwrite"), atomic_output_dir(out):
        pass
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(out, overwrite=True) as d:
        (d / "a.txt").write_text("partial")
        raise KeyboardInterrupt
    assert (out / "a.txt").read_text() == "first"  # old output untouched
    with atomic_output_dir(out, overwrite=True) as d:
        (d / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dirs left


def test_atomic_output_dir_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as d:
        (d / "x").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="disk space"), atomic_output_dir(
        out, expected_bytes=2**62
    ):
        pass
    assert list(tmp_path.iterdir()) == []
