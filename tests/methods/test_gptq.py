"""GPTQ and RTN as pure functions on one Linear whose inputs have outlier channels and
correlated columns; errors compared as tr(dW H dW^T) with a 5% margin."""

from __future__ import annotations

import pytest
import torch

from llmc.core.scheme import ClipSearch, QuantScheme, output_error, round_half_even
from llmc.core.stats import HessianStats
from llmc.methods.gptq import GPTQConfig, gptq_quantize
from llmc.methods.rtn import rtn_quantize


def layer(K: int = 96, N: int = 32, n: int = 2048, seed: int = 0):
    """W [N, K] and calibration inputs X [n, K]: low-rank correlated columns plus noise, with
    four outlier channels 10-50x larger."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g) @ torch.randn(8, K, generator=g)
    X += 0.5 * torch.randn(n, K, generator=g)
    X[:, [3, 17, 40, K - 1]] *= torch.tensor([10.0, 20.0, 35.0, 50.0])
    W = torch.randn(N, K, generator=g) / K**0.5
    stats = HessianStats(K)
    for chunk in X.split(300):
        stats.add_batch(chunk)
    return W, X, stats.H


def test_hessian_is_running_mean_of_2xxT():
    _, X, H = layer()
    ref = 2 * X.double().T @ X.double() / X.shape[0]
    torch.testing.assert_close(H.double(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("act_order", ["none", "static", "dynamic"])
@pytest.mark.parametrize("group_size", [32, -1, 40])
def test_gptq_beats_rtn(act_order, group_size):
    W, _, H = layer()
    scheme = QuantScheme(4, group_size, True)
    e_rtn = output_error(W, rtn_quantize(W, scheme).dequantize(), H)
    qw = gptq_quantize(W, H, scheme, act_order=act_order)
    e_gptq = output_error(W, qw.dequantize(), H)
    assert e_gptq < 0.95 * e_rtn
    assert qw.q.max() <= 15 and qw.q.min() >= 0
    assert qw.scales.shape == (32, scheme.num_groups(96))


def test_clip_search_lowers_error():
    W, _, H = layer(seed=1)
    scheme = QuantScheme(3, 32, True)
    plain = output_error(W, gptq_quantize(W, H, scheme).dequantize(), H)
    clipped = output_error(W, gptq_quantize(W, H, scheme, clip=ClipSearch()).dequantize(), H)
    assert clipped < 0.95 * plain
    rtn_plain = output_error(W, rtn_quantize(W, scheme).dequantize(), H)
    rtn_clip = output_error(W, rtn_quantize(W, scheme, ClipSearch()).dequantize(), H)
    assert rtn_clip < rtn_plain


def test_static_groups_keep_original_order():
    W, _, H = layer()
    qw = gptq_quantize(W, H, QuantScheme(4, 32, True), act_order="static")
    assert torch.equal(qw.g_idx, torch.arange(96, dtype=torch.int32) // 32)


def test_dynamic_groups_follow_permutation():
    W, _, H = layer()
    qw = gptq_quantize(W, H, QuantScheme(4, 32, True), act_order="dynamic")
    perm = torch.argsort(torch.diag(H), descending=True)
    expected = torch.empty(96, dtype=torch.int32)
    expected[perm] = (torch.arange(96) // 32).int()
    assert torch.equal(qw.g_idx, expected)
    # the outlier channels (largest diag(H)) come first, so they share group 0
    assert set(qw.g_idx[[3, 17, 40, 95]].tolist()) == {0}


def test_narrow_last_group():
    W, _, H = layer(K=72)
    qw = gptq_quantize(W, H, QuantScheme(4, 32, False), act_order="none")
    assert qw.scales.shape == (32, 3)
    assert (qw.g_idx == 2).sum() == 8  # 72 = 32 + 32 + 8
    assert output_error(W, qw.dequantize(), H) < 0.95 * output_error(
        W, rtn_quantize(W, QuantScheme(4, 32, False)).dequantize(), H
    )


def test_dead_inputs_zero_their_column():
    W, X, _ = layer()
    X[:, 5] = 0
    H = 2 * X.T @ X / X.shape[0]
    qw = gptq_quantize(W, H, QuantScheme(4, 32, True))
    assert torch.all(qw.dequantize()[:, 5] == 0)


def test_damping_retry_then_error(caplog):
    W, _, _ = layer(K=64)
    # One eigenvalue at -5% of the mean: fails with damp=0.01 of the mean diagonal, passes
    # with the 10x retry.
    Q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(3)))
    lam = torch.linspace(1.0, 2.0, 64)
    lam[0] = -0.05 * lam.mean()
    Hbad = Q @ torch.diag(lam) @ Q.T
    qw = gptq_quantize(W, Hbad, QuantScheme(4, 32, True), damp=0.01, name="blk.q_proj")
    assert qw.q.shape == (32, 64)
    assert "blk.q_proj" in caplog.text and "damp=0.1" in caplog.text
    lam[0] = -0.5 * lam.mean()
    with pytest.raises(ValueError, match="blk.o_proj.*damp"):
        gptq_quantize(W, Q @ torch.diag(lam) @ Q.T, QuantScheme(4, 32, True), name="blk.o_proj")


def test_results_are_on_the_grid():
    W, _, H = layer()
    qw = gptq_quantize(W, H, QuantScheme(3, 32, False), act_order="dynamic", clip=ClipSearch())
    W_hat = qw.dequantize()
    g = qw.g_idx.long()
    codes = W_hat / qw.scales[:, g] + qw.zeros[:, g]
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert torch.equal(qw.scales, qw.scales.half().float())


def test_round_half_even_matches_torch():
    x = torch.cat([torch.randn(10000) * 50, torch.arange(-20, 20) + 0.5])
    assert torch.equal(round_half_even(x), torch.round(x))


@pytest.mark.parametrize(
    "args, key",
    [({"bits": 9}, "bits"), ({"bits": 1}, "bits"), ({"group_size": 0}, "group_size"),
     ({"act_order": "yes"}, "act_order"), ({"damp": 0}, "damp"), ({"damp": 2.0}, "damp")],
)
def test_config_errors_name_the_key(args, key):
    with pytest.raises(ValueError, match=key):
        GPTQConfig(**args)


def test_a_group_shares_one_factor_and_drops_it_after_its_last_linear():
    """q, k and v compressed from one statistics object reuse the factor of H^-1 (the same
    codes as computing it afresh for each), and it is gone after the last of them."""
    from llmc.methods.gptq import GPTQ, GPTQConfig

    torch.manual_seed(0)
    X = torch.randn(256, 48)
    Ws = [torch.randn(32, 48) for _ in range(3)]
    comp = GPTQ(GPTQConfig(bits=4, group_size=16))
    shared = HessianStats(48)
    shared.add_batch(X)
    shared.readers = 3
    for i, W in enumerate(Ws):
        fresh = HessianStats(48)
        fresh.add_batch(X)
        a = comp.compress("x", W, shared)
        b = comp.compress("x", W, fresh)
        assert torch.equal(a.quant.q, b.quant.q) and torch.equal(a.weight, b.weight)
        assert bool(shared.factors) == (i < 2)


def test_column_loop_on_contiguous_rows_is_unchanged():
    """The loop walks each block transposed; the codes equal a plain strided reference."""
    torch.manual_seed(1)
    W = torch.randn(40, 64)
    X = torch.randn(200, 64)
    H = 2 * X.T @ X / 200
    scheme = QuantScheme(4, 16, False)
    qw = gptq_quantize(W, H, scheme, act_order="none", block_size=16)
    # reference: the textbook loop (Frantar et al., Algorithm 1) on strided columns
    from llmc.core.scheme import find_qparams, quantize
    from llmc.methods.gptq import _inverse_cholesky

    Hinv, _ = _inverse_cholesky(lambda: H.clone(), 0.01, "ref")
    Wr = W.clone()
    Q = torch.zeros_like(W)
    for i1 in range(0, 64, 16):
        W1 = Wr[:, i1:i1 + 16].clone()
        E = torch.zeros_like(W1)
        s, z = find_qparams(W1, scheme, None, torch.diag(H)[i1:i1 + 16])  # act_order none
        for j in range(16):
            i = i1 + j
            q = quantize(W1[:, j], s, z, scheme)
            Q[:, i] = q
            err = (W1[:, j] - (q - z) * s) / Hinv[i, i]
            W1[:, j:] -= err[:, None] * Hinv[i, i:i1 + 16][None, :]
            E[:, j] = err
        Wr[:, i1 + 16:] -= E @ Hinv[i1:i1 + 16, i1 + 16:]
    assert torch.equal(qw.q, Q.to(torch.uint8))
