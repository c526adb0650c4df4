"""Activation quantization (8-bit INT and FP8, per token) and FP8 weights on the E4M3 grid."""

from __future__ import annotations

import copy
import importlib.util

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
    ({"bits": 4, "type": "float", "strategy": "group", "dynamic": False}, "act_strategy group"),
    ({"bits": 4, "type": "int", "strategy": "group"}, "MXFP4"),
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
    fp4 = {"bits": 4, "group_size": 32, "type": "float", "act_bits": 4, "act_type": "float"}
    assert QuantArgs(**fp4).act_scheme.is_nvfp4  # the default at 4 bits
    mx = QuantArgs(**fp4, act_strategy="group").act_scheme
    assert mx == ActScheme("float", "group", True, 4) and mx.is_mx and mx.group_width == 32
    with pytest.raises(ValueError, match="neither"):
        QuantArgs(**fp4, act_strategy="tensor")


def test_mxfp4_activations():
    """E2M1 values in groups of 32 along the input, each group's power-of-two scale from its
    own maximum (an all-zero group stays zero); the input's dtype is kept; the scheme reads
    back from its compressed-tensors arguments, which name groups of 32."""
    mx = ActScheme("float", "group", True, 4)
    x = sample((3, 5, 96))
    x[0, 0, :32] = 0
    y = fake_quantize_act(x, mx)
    g, yg = x.unflatten(-1, (3, 32)), y.unflatten(-1, (3, 32))
    # amax rounded to a power of two 2^e, up from mantissa 1.75; the scale is 2^(e - 2)
    scale = 2.0 ** (torch.floor(torch.log2(g.abs().amax(-1, keepdim=True) / 1.75 * 2)) - 2)
    scale[0, 0, 0] = 1.0  # the all-zero group
    grid = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
    assert set((yg / scale).abs().unique().tolist()) <= grid
    assert torch.all(y[0, 0, :32] == 0)
    assert (yg - g).abs().le(scale * 1.0 + (g.abs() - 6 * scale).clamp(min=0)).all()
    assert torch.equal(fake_quantize_act(y, mx), y)  # idempotent
    assert fake_quantize_act(x.bfloat16(), mx).dtype == torch.bfloat16
    assert ActScheme.from_ct(mx.to_ct()) == mx
    with pytest.raises(ValueError, match="groups of 32"):
        ActScheme.from_ct({**mx.to_ct(), "group_size": 16})
    with pytest.raises(ValueError, match="divisible by 32"):
        fake_quantize_act(sample((2, 48)), mx)


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                    reason="pip install compressed-tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_activations_are_the_packages(dtype):
    """llmc's MXFP4 activations equal the compressed-tensors package's dynamic fake
    quantization of its ``input_activations`` arguments (what its models run on the CPU)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    mx = ActScheme("float", "group", True, 4)
    args = QuantizationArgs(**mx.to_ct())
    x = (sample((3, 5, 96)) * torch.logspace(-3, 2, 96)).to(dtype)
    x[1, 2, 32:64] = 0
    scale, zero = compute_dynamic_scales_and_zp(x, args, module=None)
    assert torch.equal(fake_quantize_act(x, mx), fake_quantize(x, scale, zero, args))


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


def test_fp4_rounding_is_nearest_with_ties_to_even():
    """E2M1 rounding (the weights' and activations') against the nearest level found by
    search, ties to the even mantissa, on every bfloat16 value in [-6, 6], each tie and its
    neighbours, and random float32 values."""
    from llmc.core.scheme import FP4_LEVELS, round_fp4

    def nearest(x):
        a = x.abs()
        d = (a[:, None] - FP4_LEVELS[None, :]).abs()
        best = d.min(dim=1, keepdim=True).values
        tied = d == best  # two levels at a tie: the one with an even index (mantissa 0)
        even = torch.arange(8) % 2 == 0
        idx = torch.where(tied.sum(1) > 1, (tied & even).float().argmax(1), d.argmin(1))
        return torch.copysign(FP4_LEVELS[idx], x)

    bf = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    bf = bf.float()[bf.float().abs() <= 6]
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0, 0.5, 1.0, 2.0, 4.0, 6.0])
    up, down = torch.tensor(7.0), torch.tensor(-1.0)
    near = torch.cat([ties, torch.nextafter(ties, up), torch.nextafter(ties, down).clamp(min=0)])
    rand = torch.rand(10**5, generator=torch.Generator().manual_seed(0)) * 12 - 6
    x = torch.cat([bf, near, -near, rand, torch.tensor([1e-40, -1e-40])])
    assert torch.equal(round_fp4(x.clone()), nearest(x))
    assert round_fp4(torch.tensor([2.5, 0.75, 5.0])).tolist() == [2.0, 1.0, 4.0]
