"""QuantLinear and SparseLinear on the CPU (``*_ref``) path: the same outputs as the dense
layers they replace, and packed loading of whole checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import calib_ids, tiny_model

import llmc
from llmc.core.masks import nm_keep
from llmc.core.scheme import QuantScheme
from llmc.methods.gptq import gptq_quantize
from llmc.methods.rtn import rtn_quantize
from llmc.nn import QuantLinear, SparseLinear, SparseQuantLinear


@pytest.fixture(autouse=True)
def cpu_path(monkeypatch):
    """The ``*_ref`` path (the kernels' interpreter runs are tests/kernels' business)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("bits,gs,sym", [(4, 32, True), (3, 32, False), (8, -1, True),
                                         (2, 48, False)])
def test_quant_linear_matches_the_fake_quantized_layer(bits, gs, sym):
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(40, 120, generator=g), torch.randn(40, generator=g)
    qw = rtn_quantize(W, QuantScheme(bits, gs, sym))
    ql = QuantLinear.from_quantized(qw, b.half())
    dense = torch.nn.Linear(120, 40)
    dense.weight.data, dense.bias.data = qw.dequantize(), b.half().float()
    x = torch.randn(3, 5, 120, generator=g)
    torch.testing.assert_close(ql(x), dense(x), rtol=1e-5, atol=1e-5)
    back = ql.quantized()
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros.to(torch.int32))


def test_quant_linear_keeps_act_order_g_idx():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3, 64)
    qw = gptq_quantize(torch.randn(16, 64, generator=g), 2 * X.T @ X / 256,
                       QuantScheme(4, 16, True), act_order="dynamic")
    ql = QuantLinear.from_quantized(qw)
    assert not ql.trivial_groups
    torch.testing.assert_close(ql.dequantize(), qw.dequantize())


def test_quant_linear_tracks_whether_its_groups_are_trivial():
    """The kernels' one-load-per-tile path needs ``g_idx = k // group_size``; the module
    re-checks after an in-place change or a load of g_idx, and not otherwise."""
    qw = rtn_quantize(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)),
                      QuantScheme(4, 32, False))
    m = QuantLinear.from_quantized(qw)
    assert m._check_groups() and QuantLinear(64, 16, 4, 32)._check_groups()
    torch.nn.Sequential(m).load_state_dict({}, strict=False)  # no g_idx: no change
    assert m._trivial
    m.g_idx.copy_(m.g_idx.flip(0))  # act order, in place
    assert not m._check_groups()
    m.load_state_dict({**m.state_dict(), "g_idx": torch.arange(64, dtype=torch.int32) // 32})
    assert m._trivial and m._check_groups()
    with torch.device("meta"):
        assert not QuantLinear(64, 16, 4, 32)._check_groups()  # unknown: the general path


def test_sparse_linear_matches_dense():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(24, 64, generator=g)
    W = (W * nm_keep(W.abs(), 2, 4)).half().float()
    sl = SparseLinear.from_dense(W, torch.zeros(24))
    x = torch.randn(4, 64, generator=g)
    torch.testing.assert_close(sl(x), x @ W.t(), rtol=1e-3, atol=1e-3)
    assert torch.equal(sl.dense_weight().float(), W)
    with pytest.raises(ValueError, match="not 2:4"):
        SparseLinear.from_dense(torch.ones(4, 64))


def sparse_quantized(N=24, K=96, gs=32, seed=3):
    """4-bit GPTQ codes of a 2:4 weight (pruned entries kept at zero by the mask)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    keep = nm_keep(W.abs(), 2, 4)
    X = torch.randn(128, K, generator=g)
    return gptq_quantize(W * keep, 2 * X.T @ X / 128, QuantScheme(4, gs, False),
                         act_order="none", keep=keep)


@pytest.mark.parametrize("gs", [32, -1])
def test_sparse_quant_linear_matches_the_dense_layer(gs):
    qw = sparse_quantized(gs=gs)
    b = torch.randn(24)
    sq = SparseQuantLinear.from_quantized(qw, b.half())
    assert sq.qvalues.shape == (96 // 16, 24) and sq.meta.shape == (3, 24)
    ql = QuantLinear.from_quantized(qw, b.half())
    torch.testing.assert_close(sq.dequantize(), ql.dequantize())  # same weight, 2:4 storage
    x = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sq(x), ql(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(SparseQuantLinear.from_quant_linear(ql).qvalues, sq.qvalues)


def test_sparse_quant_linear_refusals():
    g = torch.Generator().manual_seed(5)
    with pytest.raises(ValueError, match="not 2:4"):  # a dense weight
        SparseQuantLinear.from_quantized(rtn_quantize(torch.randn(8, 64, generator=g),
                                                      QuantScheme(4, 32, True)))
    with pytest.raises(ValueError, match="4-bit"):
        SparseQuantLinear.from_quantized(rtn_quantize(torch.randn(8, 64, generator=g),
                                                      QuantScheme(8, 32, True)))
    X = torch.randn(64, 64, generator=g) * torch.linspace(0.1, 3, 64)
    qw = gptq_quantize(torch.randn(8, 64, generator=g), X.T @ X, QuantScheme(4, 16, True),
                       act_order="dynamic")
    with pytest.raises(ValueError, match="g_idx"):
        SparseQuantLinear.from_quantized(qw)
    with pytest.raises(ValueError, match="multiple of 4"):
        SparseQuantLinear(64, 8, group_size=6)


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_packed_load_builds_quant_linears(tmp_path, fmt):
    model, _ = llmc.compress(tiny_model("llama"), {"steps": [
        {"method": "gptq", "args": {"bits": 4, "group_size": 32}}]}, calibration=calib_ids(),
        progress=False)
    out = llmc.save(model, tmp_path / fmt, format=fmt)
    packed, _ = llmc.load(out, packed=True)
    layers = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    assert not any(p.is_meta for p in packed.parameters())
    assert not any(b.is_meta for b in packed.buffers())
    x = calib_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(packed(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["float", "int"])
@pytest.mark.parametrize("M", [3, 40])
def test_w8a8_linear_computes_the_fake_quantized_product(kind, M):
    """W8A8Linear's 8-bit matmul (``_scaled_mm`` / ``_int_mm``, or float32 below their
    shapes) equals the dequantized weight times the fake-quantized input."""
    from llmc.core.act import ActScheme, fake_quantize_act
    from llmc.core.scheme import QuantScheme
    from llmc.methods.rtn import rtn_quantize
    from llmc.nn import W8A8Linear

    g = torch.Generator().manual_seed(M)
    W, b = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    qw = rtn_quantize(W, QuantScheme(8, -1, True, kind))
    m = W8A8Linear.from_quantized(qw, b)
    x = torch.randn(2, M, 64, generator=g)
    ref = fake_quantize_act(x, ActScheme(kind)) @ qw.dequantize().t() + b
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    assert W8A8Linear.supports(qw, ActScheme(kind))
    assert not W8A8Linear.supports(qw, ActScheme("float" if kind == "int" else "int"))
