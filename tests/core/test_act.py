"""Activation quantization (8-bit INT and FP8, per token) and FP8 weights on the E4M3 grid."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llmc.core import act
from llmc.core.act import ActScheme, attach, fake_quantize_act
from llmc.core.scheme import FP8_MAX, QuantArgs, QuantScheme
from llmc.methods.rtn import rtn_compress


def sample(shape=(3, 5, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 7] *= 40  # an outlier channel
    return x


def test_int8_per_token_is_on_the_grid():
    x = sample()
    y = fake_quantize_act(x, ActScheme("int"))
    s = x.abs().amax(dim=-1, keepdim=True) / 127
    codes = y / s
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.abs().max() <= 127 + 1e-3
    # each token's largest entry is exactly representable: +-127 codes
    assert torch.allclose(y.abs().amax(dim=-1), x.abs().amax(dim=-1), rtol=1e-6)
    assert not torch.equal(y, x) and (y - x).abs().max() <= s.max() / 2 + 1e-6


def test_fp8_per_token_matches_the_e4m3_cast():
    x = sample()
    y = fake_quantize_act(x, ActScheme("float"))
    s = x.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    assert torch.equal(y, (x / s).to(torch.float8_e4m3fn).float() * s)
    assert torch.equal(fake_quantize_act(y, ActScheme("float")), y)  # idempotent
    assert fake_quantize_act(x.bfloat16(), ActScheme("float")).dtype == torch.bfloat16


def test_per_tensor_dynamic_uses_one_scale():
    x = sample()
    y = fake_quantize_act(x, ActScheme("int", strategy="tensor"))
    s = x.abs().max() / 127
    assert torch.allclose(y / s, (y / s).round(), atol=1e-3)


def test_attach_quantizes_the_input_and_survives_a_copy():
    lin = nn.Linear(64, 8)
    x = sample()
    ref = lin(x)
    act.attach(lin, ActScheme("int"))
    want = nn.functional.linear(fake_quantize_act(x, ActScheme("int")), lin.weight, lin.bias)
    assert torch.equal(lin(x), want) and not torch.equal(lin(x), ref)
    assert torch.equal(copy.deepcopy(lin)(x), want)
    act.attach(lin, ActScheme("float"))  # replaces, one hook
    assert len(lin._forward_pre_hooks) == 1
    act.detach(lin)
    assert torch.equal(lin(x), ref)


@pytest.mark.parametrize("kw, match", [
    ({"type": "fp4"}, "act_type"),
    ({"strategy": "channel"}, "act_strategy"),
    ({"strategy": "group", "dynamic": False}, "act_strategy group"),
    ({"bits": 4}, "NVFP4"),
    ({"bits": 6}, "act_bits"),
    ({"strategy": "tensor_group"}, "tensor_group"),
    ({"strategy": "token", "dynamic": False}, "per-token"),
])
def test_bad_activation_schemes_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        ActScheme(**kw)


def test_activation_arguments():
    static = QuantArgs(bits=8, group_size=-1, act_bits=8, act_strategy="tensor",
                       act_dynamic=False)
    assert static.act_scheme == ActScheme("int", "tensor", dynamic=False)
    with pytest.raises(ValueError, match="per-token"):
        QuantArgs(bits=8, group_size=-1, act_bits=8, act_dynamic=False)
    with pytest.raises(ValueError, match="static activation scheme needs"):
        attach(torch.nn.Linear(4, 4), static.act_scheme)
    assert QuantArgs().act_scheme is None
    assert QuantArgs(act_bits=8, act_type="float").act_scheme == ActScheme("float")


def test_fp8_weights_per_channel():
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    scheme = QuantScheme(8, -1, True, "float")
    qw, dense = rtn_compress(W, scheme)
    assert qw.q.dtype == torch.float8_e4m3fn and qw.type == "float"
    assert torch.equal(qw.dequantize(), dense)
    assert torch.equal(dense, qw.q.float() * qw.scales)
    # each row's largest weight is exact (amax / scale = 448), the rest within E4M3's spacing
    assert torch.allclose(dense.abs().amax(dim=1), W.abs().amax(dim=1), rtol=1e-6)
    assert ((dense - W).abs() <= W.abs() / 16 + 1e-12).all()
    back = qw.state().codes(dense)  # the codes recovered from the dense weight
    assert torch.equal(back.q.float(), qw.q.float())
    with pytest.raises(ValueError, match="no longer on its quantization grid"):
        qw.state().codes(dense * 1.001)


@pytest.mark.parametrize("kw", [{"bits": 4}, {"sym": False}])
def test_fp8_weight_schemes_are_8_bit_symmetric(kw):
    with pytest.raises(ValueError, match="FP8 E4M3"):
        QuantScheme(**{"bits": 8, "group_size": -1, "sym": True, "type": "float", **kw})
