"""The kernel-native INT4 layout: repack -> unpack gives the codes back bit for bit, and the
words hold what the MMA fragment and the fp16 bit trick expect."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmc.core.scheme import QuantScheme, rtn_codes
from llmc.formats.gptq import gptq_tensors
from llmc.kernels.native import (
    dequantize_native,
    native_matmul,
    native_matmul_ref,
    repack_fused,
    repack_native,
    repack_native_24,
    unpack_native,
    unpack_native_24,
)
from llmc.kernels.wq_matmul import wq_matmul_ref


def _count_native_calls(monkeypatch) -> list:
    """A list that grows by one at each native_matmul call, eager or inside the custom op."""
    import llmc.kernels.native as native
    from llmc.kernels import ops

    calls, real = [], native.native_matmul

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for where in (native, ops):
        monkeypatch.setattr(where, "native_matmul", counted)
    return calls


def _random(N, K, group_size, act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = -(-K // group_size)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    s = (torch.rand(N, G, generator=g) + 0.1).to(torch.float16)
    z = torch.randint(0, 16, (N, G), generator=g, dtype=torch.int32)
    g_idx = torch.arange(K, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    return q, s, z, g_idx


@pytest.mark.parametrize("N,K,group_size,act_order", [
    (16, 64, 64, False), (64, 256, 128, False), (48, 192, 32, False),
    (40, 320, 64, True), (17, 100, 4, False), (128, 512, 128, True)])
def test_round_trip_is_bit_exact(N, K, group_size, act_order):
    q, s, z, g_idx = _random(N, K, group_size, act_order)
    w = repack_native(q, s, z, g_idx, group_size)
    assert w.words.dtype == torch.int32
    assert w.words.shape == (-(-N // 16), -(-K // 64), 32, 4)
    assert (w.perm is not None) == act_order
    q2, s2, z2, g2 = unpack_native(w)
    assert torch.equal(q2, q) and torch.equal(g2, g_idx)
    assert torch.equal(s2, s) and torch.equal(z2, z)


def test_words_follow_the_mma_fragment_and_nibble_order():
    q, s, z, g_idx = _random(16, 64, 64, seed=3)
    w = repack_native(q, s, z, g_idx, 64)
    words = w.words[0, 0].to(torch.int64) & 0xFFFFFFFF
    for lane in (0, 5, 13, 31):
        for step in range(4):
            g = lane // 4
            c = 16 * step + 2 * (lane % 4)
            # a0 a1: (g, c..c+1); a2 a3: (g+8, c..c+1); a4 a5: (g, c+8..); a6 a7: (g+8, c+8..)
            frag = [q[g, c], q[g, c + 1], q[g + 8, c], q[g + 8, c + 1],
                    q[g, c + 8], q[g, c + 9], q[g + 8, c + 8], q[g + 8, c + 9]]
            word = int(words[lane, step])
            for i in range(4):  # (word >> 4i) & 0x000F000F: the pair (a_2i, a_2i+1)
                pair = (word >> (4 * i)) & 0x000F000F
                assert pair & 0xFFFF == int(frag[2 * i])
                assert pair >> 16 == int(frag[2 * i + 1])


def test_fp16_bit_trick_gives_the_codes():
    q, s, z, g_idx = _random(32, 128, 64, seed=4)
    w = repack_native(q, s, z, g_idx, 64)
    words = w.words.to(torch.int64) & 0xFFFFFFFF
    got = []
    for i in range(4):
        pair = ((words >> (4 * i)) & 0x000F000F) | 0x64006400
        halves = torch.where(pair >= 2**31, pair - 2**32, pair).to(torch.int32)
        got.append(halves.view(torch.float16).float() - 1024)  # [.., 4 words * 2 halves]
    codes = torch.stack(got, -1)  # element (half h, pair i) is a_{2i+h}
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.equal(codes.round(), codes)
    assert sorted(codes.flatten().long().bincount(minlength=16).tolist()) == \
        sorted(q.flatten().long().bincount(minlength=16).tolist())


def test_scales_put_a_lanes_two_rows_side_by_side():
    q, s, z, g_idx = _random(32, 128, 64, seed=5)
    w = repack_native(q, s, z, g_idx, 64)
    for lane in (0, 7, 30):
        r = lane // 4
        for tile in range(2):
            assert w.scales[1, 16 * tile + 2 * r] == s[16 * tile + r, 1]
            assert w.scales[1, 16 * tile + 2 * r + 1] == s[16 * tile + r + 8, 1]
            assert w.zeros[0, 16 * tile + 2 * r + 1] == z[16 * tile + r + 8, 0]


@pytest.mark.parametrize("sym", [True, False])
def test_matches_the_gptq_layout_on_a_quantized_weight(sym):
    torch.manual_seed(0)
    W = torch.randn(96, 256)
    qw = rtn_codes(W, QuantScheme(bits=4, group_size=64, sym=sym))
    w = repack_native(qw.q, qw.scales, qw.zeros, qw.g_idx, 64)
    assert torch.equal(dequantize_native(w), qw.dequantize())
    t = gptq_tensors("l", qw, None, "gptq_v2")
    x = torch.randn(3, 256)
    ref = wq_matmul_ref(x, t["l.qweight"], t["l.scales"], t["l.qzeros"], t["l.g_idx"], 4)
    torch.testing.assert_close(native_matmul_ref(x, w), ref, rtol=1e-5, atol=1e-5)


def test_fused_rows_keep_each_linears_codes():
    parts = [_random(n, 128, 64, seed=n) for n in (32, 16, 16)]
    g = parts[0][3]
    parts = [(q, s, z, g) for q, s, z, _ in parts]
    w = repack_fused(parts, 64)
    assert w.splits == [0, 32, 48] and w.out_features == 64
    q, s, z, _ = unpack_native(w)
    assert torch.equal(q, torch.cat([p[0] for p in parts]))
    assert torch.equal(s, torch.cat([p[1] for p in parts]))


def test_bad_input_is_refused():
    q, s, z, g = _random(16, 128, 64)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        repack_native(q.to(torch.int32) + 16, s, z, g, 64)
    ragged = torch.tensor([0] * 70 + [1] * 58, dtype=torch.int32)
    with pytest.raises(ValueError, match="not 64 wide"):
        repack_native(q, s, z, ragged, 64)
    with pytest.raises(ValueError, match="same in_features"):
        repack_fused([(q, s, z, g), (q[:, :64], s[:, :1], z[:, :1], g[:64])], 64)
    with pytest.raises(ValueError, match="multiple or a divisor"):
        repack_native(q, s, z, g, 48)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton is not installed (pip install triton)")
@pytest.mark.parametrize("M,N,K,group_size,act_order,tiles,dtype", [
    (1, 32, 128, 64, False, 2, torch.float16),
    (3, 40, 192, 128, False, 1, torch.float32),  # K not a multiple of the group
    (16, 48, 128, 32, True, 2, torch.bfloat16),
    (5, 17, 100, 4, False, 2, torch.float16)])
def test_triton_decode_kernel_matches_the_reference(monkeypatch, M, N, K, group_size,
                                                    act_order, tiles, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, s, z, g_idx = _random(N, K, group_size, act_order, seed=M)
    w = repack_native(q, s, z, g_idx, group_size)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = native_matmul(x, w, tiles=tiles)
    ref = native_matmul_ref(x, w)
    assert y.dtype == dtype and y.shape == (M, N)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}.get(dtype, 2e-3)
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= tol * ref.float().abs().max().item()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton is not installed (pip install triton)")
@pytest.mark.parametrize("M,N,K,group_size,act_order,dtype", [
    (17, 70, 128, 64, False, torch.float16),  # one tile-row of 64 programs' N left over
    (40, 32, 192, 32, True, torch.bfloat16),  # groups narrower than a tile, act order
    (100, 20, 100, 4, False, torch.float32)])  # K and N ragged, x in two programs of 64 rows
def test_triton_prefill_kernel_matches_the_reference(monkeypatch, M, N, K, group_size,
                                                     act_order, dtype):
    from llmc.kernels._native_triton import config

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert config(M, 2) == (min(64, 1 << (M - 1).bit_length()), 4)
    q, s, z, g_idx = _random(N, K, group_size, act_order, seed=M)
    w = repack_native(q, s, z, g_idx, group_size)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = native_matmul(x, w)
    ref = native_matmul_ref(x, w)
    assert y.dtype == dtype and y.shape == (M, N)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}.get(dtype, 2e-3)
    assert (y.float() - ref.float()).abs().max().item() <= tol * ref.float().abs().max().item()


def test_above_256_rows_the_weight_is_dequantized_once(monkeypatch):
    """More than 256 rows of x: one dense matmul on the weight dequantized into x's dtype
    (cuBLAS on a GPU), not the kernel."""
    import llmc.kernels._native_triton as nt

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(nt, "launch", lambda *a, **k: pytest.fail("the kernel ran"))
    q, s, z, g_idx = _random(24, 64, 32, seed=3)
    w = repack_native(q, s, z, g_idx, 32)
    x = torch.randn(2, 150, 64, generator=torch.Generator().manual_seed(4))
    y = native_matmul(x, w)
    assert y.shape == (2, 150, 24)
    assert torch.equal(y, x @ dequantize_native(w).t())


def _sparse24(N, K, group_size, seed=0):
    from llmc.core.masks import nm_keep

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    W = W * nm_keep(W, 2, 4)
    qw = rtn_codes(W, QuantScheme(bits=4, group_size=group_size, sym=False))
    return W, qw


@pytest.mark.parametrize("N,K,group_size", [(16, 128, 128), (40, 256, 64), (20, 96, 32)])
def test_24_round_trip_is_bit_exact(N, K, group_size):
    from llmc.core.masks import nm_slots

    W, qw = _sparse24(N, K, group_size)
    w = repack_native_24(qw.q, W, qw.scales, qw.zeros, qw.g_idx, group_size)
    assert w.words.shape == (-(-N // 16), -(-K // 128), 32, 4)
    assert w.meta.shape == (-(-N // 16), -(-K // 128), 32, 2)
    kept, pos, s, z = unpack_native_24(w)
    want = nm_slots(W, 2, 4)
    assert torch.equal(pos, want)
    assert torch.equal(kept.long(), torch.gather(qw.q.long().reshape(N, K // 4, 4), -1,
                                                 want).reshape(N, K // 2))
    assert torch.equal(s.float(), qw.scales) and torch.equal(z, qw.zeros)
    dense = dequantize_native(w)
    assert torch.equal(dense, qw.dequantize())
    assert bool((dense[W == 0] == 0).all())  # pruned entries exactly 0


def test_24_refuses_dense_or_act_order_weights():
    W, qw = _sparse24(16, 128, 64)
    with pytest.raises(ValueError):
        repack_native_24(qw.q, torch.randn(16, 128), qw.scales, qw.zeros, qw.g_idx, 64)
    with pytest.raises(ValueError, match="act"):
        repack_native_24(qw.q, W, qw.scales, qw.zeros, qw.g_idx.flip(0), 64)
    with pytest.raises(ValueError, match="unpack_native_24"):
        unpack_native(repack_native_24(qw.q, W, qw.scales, qw.zeros, qw.g_idx, 64))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton is not installed (pip install triton)")
@pytest.mark.parametrize("M,N,K,group_size", [(1, 32, 256, 128), (7, 20, 96, 32),
                                               (24, 40, 256, 128), (33, 20, 160, 32)])
def test_triton_kernel_on_24(monkeypatch, M, N, K, group_size):
    """Decode (a reduction over x's rows) and prefill (each tile expanded for one MMA)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    W, qw = _sparse24(N, K, group_size, seed=M)
    w = repack_native_24(qw.q, W, qw.scales, qw.zeros, qw.g_idx, group_size)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    y = native_matmul(x, w)
    ref = native_matmul_ref(x, w)
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= 2e-3 * ref.float().abs().max().item()


@pytest.mark.parametrize("group_size,act_order", [(64, False), (128, True), (-1, False)])
def test_from_a_packed_quant_linear(group_size, act_order):
    from llmc.kernels.native import from_quant_linear
    from llmc.nn import QuantLinear

    g = torch.Generator().manual_seed(7)
    qw = rtn_codes(torch.randn(48, 256, generator=g), QuantScheme(4, group_size, False))
    if act_order:
        qw.g_idx = qw.g_idx[torch.randperm(256, generator=g)].contiguous()
    ql = QuantLinear.from_quantized(qw, dtype=torch.float16)
    w = from_quant_linear(ql)
    assert (w.perm is not None) == act_order
    q, s, z, g_idx = unpack_native(w)
    assert torch.equal(q, qw.q) and torch.equal(z, qw.zeros) and torch.equal(g_idx, qw.g_idx)
    x = torch.randn(2, 256, generator=g).to(torch.float16)
    ref = ql(x)
    got = native_matmul_ref(x, w)
    assert (got.float() - ref.float()).abs().max() <= 2e-3 * ref.float().abs().max()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton is not installed (pip install triton)")
def test_packed_load_in_the_native_layout(tmp_path, monkeypatch):
    from conftest import calib_ids, tiny_model

    import llmc
    from llmc.nn import QuantLinear

    model, _ = llmc.compress(tiny_model("llama"), {"steps": [
        {"method": "gptq", "args": {"bits": 4, "group_size": 32}}]}, calibration=calib_ids(),
        progress=False)
    out = llmc.save(model, tmp_path / "gptq")
    with pytest.raises(ValueError, match="packed=True"):
        llmc.load(out, native_layout=True)
    packed, _ = llmc.load(out, packed=True, native_layout=True)
    layers = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.native is not None or m.fused is not None
                                     for m in layers)
    calls = _count_native_calls(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the decode kernel on the CPU
    x = calib_ids(1, 4)
    with torch.no_grad():
        got = packed(x).logits
        want = model(x).logits
    assert len(calls) >= 8  # every layer went through the native path (q/k/v, gate/up fused)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton is not installed (pip install triton)")
def test_compiled_calls_run_on_the_native_layout_as_one_op(monkeypatch):
    """``torch.compile(fullgraph=True)`` traces a QuantLinear with the native layout as one
    custom op (``llmc::native_matmul``) and gives the eager result, decode and prefill."""
    from llmc.nn import QuantLinear

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(5))
    ql = QuantLinear.from_quantized(rtn_codes(W, QuantScheme(4, 64, True)), torch.randn(48))
    ql.use_native_layout()
    calls = _count_native_calls(monkeypatch)
    for M in (3, 40):
        x = torch.randn(M, 128, generator=torch.Generator().manual_seed(M)).half()
        eager = ql(x)
        torch._dynamo.reset()
        compiled = torch.compile(ql, fullgraph=True, backend="eager")(x)
        assert torch.equal(compiled, eager)
    assert len(calls) == 4  # eager and compiled, twice: the GPTQ-layout kernel never ran


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton is not installed (pip install triton)")
def test_siblings_are_fused_at_load(tmp_path, monkeypatch):
    """A native-layout load runs each block's q/k/v and gate/up as one matmul (4 per block
    instead of 7), with the logits of the unfused layers, eager and compiled."""
    from conftest import calib_ids, tiny_model

    import llmc

    model, _ = llmc.compress(tiny_model("llama"), {"steps": [
        {"method": "gptq", "args": {"bits": 4, "group_size": 32}}]}, calibration=calib_ids(),
        progress=False)
    out = llmc.save(model, tmp_path / "gptq")
    fused, _ = llmc.load(out, packed=True, native_layout=True)
    attn = fused.model.layers[0].self_attn
    assert attn.q_proj.fused is attn.v_proj.fused is not None and attn.o_proj.fused is None
    assert attn.q_proj.native is None and attn.o_proj.native is not None
    assert fused.model.layers[1].mlp.up_proj.fused.native.splits == [0, 128]
    calls = _count_native_calls(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = calib_ids(1, 4)
    with torch.no_grad():
        got = fused(x).logits
        assert len(calls) == 8  # 2 blocks x (q/k/v, o, gate/up, down)
        torch.testing.assert_close(got.float(), model(x).logits.float(), rtol=2e-2, atol=2e-2)
        assert attn.q_proj.fused.y is None  # let go once every member took its rows
        torch._dynamo.reset()
        compiled = torch.compile(fused.model, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x).last_hidden_state, fused.model(x).last_hidden_state)
