"""RTN's codes-only path (what a streamed data-free walk writes): the same codes and qparams as
the qparams-then-quantize route on float32, from any float dtype, without a dense weight."""

from __future__ import annotations

import pytest
import torch

from llmc.core.scheme import (
    ClipSearch,
    QuantScheme,
    grouped_qparams,
    quantize_with_groups,
    rtn_codes,
)
from llmc.methods.rtn import RTN, RTNConfig

SCHEMES = [
    QuantScheme(4, 128, True),
    QuantScheme(4, 64, False),
    QuantScheme(3, -1, True),
    QuantScheme(2, 32, False),
    QuantScheme(4, 96, True),  # 512 columns: a narrow last group
    QuantScheme(4, 64, True, full_range=True),
    QuantScheme(3, 96, True, full_range=True),
    QuantScheme(8, -1, True, "float"),
    QuantScheme(8, 128, True, "float", block_rows=128),
    QuantScheme(4, 16, True, "float"),
    QuantScheme(4, 32, True, "float"),
]


def reference(W, scheme, clip):
    Wf = W.float()
    scheme = scheme.for_weight(Wf)
    scales, zeros = grouped_qparams(Wf, scheme, clip)
    return quantize_with_groups(Wf, scales, zeros, scheme.default_g_idx(W.shape[1]), scheme)


CASES = [(s, None) for s in SCHEMES] + [(s, ClipSearch()) for s in SCHEMES if s.type == "int"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scheme,clip", CASES,
                         ids=[f"{s}-{'clip' if c else 'minmax'}" for s, c in CASES])
def test_codes_equal_the_reference(dtype, scheme, clip):
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(300, 512, generator=g) * 0.02).to(dtype)
    W[3] = 0  # an all-zero row
    W[5, :64] = 0
    a, b = rtn_codes(W, scheme, clip), reference(W, scheme, clip)
    for k in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
        assert getattr(a, k).dtype == getattr(b, k).dtype, k
    assert a.global_scale == b.global_scale


def test_compress_codes_gives_no_weight_and_the_same_codes():
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    rtn = RTN(RTNConfig(bits=4, group_size=64))
    full = rtn.compress("x", W.float(), None)
    codes = rtn.compress_codes("x", W)
    assert codes.weight is None
    assert torch.equal(codes.quant.q, full.quant.q)
    assert torch.equal(codes.quant.dequantize(), full.weight)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_ties_round_half_to_even_as_the_reference(bits):
    """Symmetric codes are made with the zero point folded into the rounding; exact halves
    (w / s = k + 0.5) must still round to even before the zero point is added."""
    maxq = 2**bits - 1
    amax = maxq / 2  # scale 2 * amax / maxq = 1 exactly
    row = torch.tensor([amax] + [k + 0.5 for k in range(-(maxq // 2) - 1, maxq // 2)])
    W = torch.zeros(4, 512)
    W[:, : row.numel()] = row
    W[1] *= -1
    scheme = QuantScheme(bits, 256, True)
    a, b = rtn_codes(W, scheme), reference(W, scheme, None)
    assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales)


def test_codes_do_not_change_the_input():
    W = torch.randn(70, 256, generator=torch.Generator().manual_seed(2))
    before = W.clone()
    rtn_codes(W, QuantScheme(4, 64, True))
    assert torch.equal(W, before)


def test_full_range_puts_the_largest_magnitude_on_the_long_end():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(64, 256, generator=g)
    half, full = QuantScheme(4, 64, True), QuantScheme(4, 64, True, full_range=True)
    qh, qf = rtn_codes(W, half), rtn_codes(W, full)
    Wf = qf.dequantize()
    groups = W.reshape(64, 4, 64)
    big = groups.abs().argmax(-1, keepdim=True)
    wmax = groups.gather(-1, big)
    # exact up to the fp16 scale: the largest magnitude is code 0 (q - z = -8) in every group
    assert torch.equal(qf.q.reshape(64, 4, 64).gather(-1, big), torch.zeros_like(big,
                                                                             dtype=torch.uint8))
    torch.testing.assert_close(Wf.reshape(64, 4, 64).gather(-1, big), wmax, rtol=1e-3, atol=0)
    assert torch.equal(qf.scales < 0, wmax.squeeze(-1) > 0)  # the sign follows that weight
    err = lambda q: float((q.dequantize() - W).norm() / W.norm())  # noqa: E731
    assert err(qf) < 0.95 * err(qh)  # a finer step: about 8% less error on Gaussian weights
    with pytest.raises(ValueError, match="full_range"):
        QuantScheme(4, 64, False, full_range=True)
    with pytest.raises(ValueError, match="full_range"):
        RTNConfig(bits=8, group_size=-1, type="float", full_range=True)


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_full_range_checkpoints_load_back_exactly(tmp_path, fmt):
    """Negative scales go through every writer and reader bit-exactly, and QuantLinear
    computes with them."""
    from conftest import assert_exports_exactly, tiny_model

    import llmc
    from llmc.nn import QuantLinear

    model = tiny_model("llama")
    recipe = {"steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 32,
                                                   "full_range": True}}]}
    model, report = llmc.compress(model, recipe, progress=False)
    m = model.model.layers[0].mlp.down_proj
    assert (m.llmc_quant.scales < 0).any()
    assert_exports_exactly(model, report, tmp_path, formats=[fmt])
    x = torch.randn(3, m.in_features)
    ql = QuantLinear.from_quantized(m.llmc_quant.codes(m.weight.data), m.bias, torch.float32)
    torch.testing.assert_close(ql(x), m(x), rtol=1e-4, atol=1e-4)
