"""The Triton kernels against their ``*_ref`` twins under ``TRITON_INTERPRET=1`` on CPU: small
odd shapes (K and N not multiples of the tiles, a narrow last group, act-order ``g_idx``), both
launch configurations and split-K."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmc.core.masks import nm_keep
from llmc.core.scheme import QuantScheme
from llmc.kernels.sparse24 import (
    compress_24,
    compress_24_codes,
    expand_24_quant_ref,
    expand_24_ref,
    sparse24_matmul,
    sparse24_matmul_ref,
    sparse24_quant_matmul,
    sparse24_quant_matmul_ref,
)
from llmc.kernels.wq_matmul import wq_matmul, wq_matmul_ref
from llmc.methods.rtn import rtn_quantize
from llmc.nn import QuantLinear

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed (pip install triton)")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def packed(N, K, bits, group_size, sym=False, act_order=False, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    qw = rtn_quantize(torch.randn(N, K, generator=g), QuantScheme(bits, group_size, sym))
    if act_order:
        qw.g_idx = qw.g_idx[torch.randperm(K, generator=g)].contiguous()
    return QuantLinear.from_quantized(qw, dtype=dtype)


def close(y, ref, dtype):
    """fp32: accumulation-order noise; fp16 / bf16: a few ulps of the output's scale."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}.get(dtype, 2e-3)
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= tol * scale, (err, scale)


@pytest.mark.parametrize("M,K,N,bits,gs", [
    (1, 200, 72, 4, 64),    # decode; K, N off the tiles; narrow last group (200 = 3*64 + 8)
    (5, 128, 40, 4, 32),
    (20, 136, 40, 4, 32),   # prefill config, narrow last group
    (3, 96, 48, 8, 32),
    (3, 96, 48, 2, -1),     # per channel
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_wq_matmul_matches_ref(M, K, N, bits, gs, dtype):
    ql = packed(N, K, bits, gs, dtype=dtype)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = wq_matmul_ref(x, ql.qweight, ql.scales, ql.qzeros, ql.g_idx, bits)
    close(wq_matmul(x, ql.qweight, ql.scales, ql.qzeros, ql.g_idx, bits), ref, dtype)
    if gs != -1:  # the one-load-per-tile path for trivial groups
        close(wq_matmul(x, ql.qweight, ql.scales, ql.qzeros, ql.g_idx, bits, gs), ref, dtype)


def test_wq_matmul_act_order_and_split_k():
    from llmc.kernels._wq_triton import _cfg, launch

    ql = packed(40, 160, 4, 32, act_order=True)
    assert not ql.trivial_groups
    x = torch.randn(2, 160, generator=torch.Generator().manual_seed(2)).half()
    ref = wq_matmul_ref(x, ql.qweight, ql.scales, ql.qzeros, ql.g_idx, 4)
    close(wq_matmul(x, ql.qweight, ql.scales, ql.qzeros, ql.g_idx, 4), ref, torch.float16)
    for split_dot in (True, False):
        cfg = _cfg(16, 32, 16 if split_dot else 4, 3, 4, 2, split_dot)
        close(launch(x, ql.qweight, ql.scales, ql.qzeros, ql.g_idx, 4, None, cfg), ref,
              torch.float16)


# Every config the GPU tuner may pick, on odd shapes: trivial groups inside a tile (TILE),
# groups narrower than the tile (WORD), act order (ROW), 8-bit and 2-bit per channel; and on
# shapes that are whole tiles (the GEMV's unchecked loads), in fp16 and bf16 (the tile
# kernel's 16-bit float codes).
@pytest.mark.parametrize("M,K,N,bits,gs,act,dtype", [
    (1, 200, 72, 4, 64, False, torch.float16), (3, 520, 40, 4, 128, False, torch.float16),
    (20, 136, 40, 4, 32, False, torch.float16), (3, 200, 48, 8, 32, False, torch.float16),
    (2, 160, 40, 4, 32, True, torch.float16), (3, 300, 48, 2, -1, False, torch.float16),
    (1, 256, 256, 4, 128, False, torch.float16), (2, 512, 256, 4, 64, False, torch.bfloat16),
    (3, 256, 256, 8, 64, False, torch.bfloat16),
])
def test_wq_matmul_every_tuned_config(M, K, N, bits, gs, act, dtype):
    from llmc.kernels._wq_triton import DECODE, PREFILL, launch

    ql = packed(N, K, bits, gs, act_order=act, seed=M, dtype=dtype)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(5)).to(dtype)
    ref = wq_matmul_ref(x, ql.qweight, ql.scales, ql.qzeros, ql.g_idx, bits)
    group = None if act or gs == -1 else gs
    for cfg in DECODE + PREFILL:
        if (dtype == torch.bfloat16 and not cfg.kwargs.get("GEMV")) or cfg.kwargs.get("HALF2"):
            continue  # the interpreter runs no PTX and its tl.dot gives garbage in bf16
            # (benchmarks/kernel_bench.py --checks runs these configs on a GPU)
        args = (x, ql.qweight, ql.scales, ql.qzeros, ql.g_idx, bits, group, cfg)
        if cfg.kwargs.get("SWAP") and not (bits == 4 and group
                                           and group % (8 * cfg.kwargs["BLOCK_W"]) == 0):
            with pytest.raises(ValueError, match="swapped-operand"):
                launch(*args)  # 4-bit codes in groups of whole K tiles only
            continue
        close(launch(*args), ref, dtype)


@pytest.mark.parametrize("dtype,magic", [(torch.float16, 0x6400), (torch.bfloat16, 0x4300)])
def test_16_bit_float_codes_are_exact(dtype, magic):
    """The tile kernel's dequantization: ``(q | magic) - (z | magic)`` read as 16-bit floats is
    ``q - z`` exactly, for every 4-bit code and zero point (and 8-bit codes in fp16)."""
    from llmc.kernels._wq_triton import _magic16

    assert _magic16(torch.empty(0, dtype=dtype), 4) == magic
    assert _magic16(torch.empty(0, dtype=torch.float32), 4) == 0
    assert _magic16(torch.empty(0, dtype=torch.bfloat16), 8) == 0
    top = 256 if dtype == torch.float16 else 16
    q = torch.arange(top, dtype=torch.int32)
    as16 = lambda v: (v | magic).to(torch.int16).view(dtype)  # noqa: E731
    got = as16(q)[:, None] - as16(q)[None, :]
    assert torch.equal(got.float(), (q[:, None] - q[None, :]).float())


def test_swapped_operand_kernel_refuses_what_it_cannot_take():
    from llmc.kernels._wq_triton import _swap, launch

    ql = packed(64, 256, 4, 128)
    a = (ql.qweight, ql.scales, ql.qzeros, ql.g_idx, 4)
    for x, group, cfg in [
        (torch.randn(2, 256), 128, _swap(128, 16, 4, 4, 3, pairs=False)),  # fp32 x
        (torch.randn(2, 256).half(), 64, _swap(128, 16, 4, 4, 3)),  # group of half a tile
        (torch.randn(2, 256).half(), None, _swap(128, 8, 4, 4, 3)),  # g_idx (act order)
        (torch.randn(2, 256).bfloat16(), 128, _swap(128, 16, 4, 4, 3)),  # PTX pairs in bf16
    ]:
        with pytest.raises(ValueError, match="swapped-operand"):
            launch(x, *a, group, cfg)


def test_swapped_operand_byte_pairs_ptx_constants():
    """The PTX of the swapped-operand kernel's byte pairs, evaluated by the PTX ISA's own
    definitions of prmt, lop3 and fma.f16x2 (the interpreter runs a Triton transcription of
    it, so this checks the constants themselves): every byte and zero point gives ``q - z``
    for both nibbles, exactly."""
    import inspect
    import re

    from llmc.kernels import _swap_triton as sw

    src = inspect.getsource(sw._byte_pair_asm.fn)
    sels = [int(v, 16) for v in re.findall(r'sel: tl.constexpr = "(0x[0-9a-fA-F]+)"', src)]
    assert len(sels) == 4
    assert "lop3.b32 t, t, 0x00F0000F, 0x64006400, 0xea" in src and "0x2C003C00" in src
    v = torch.arange(256, dtype=torch.int64)
    word = sum(((v + i) % 256) << (8 * i) for i in range(4))  # four different bytes
    z = torch.arange(16, dtype=torch.int64)
    zz = (z | 0xE400) | ((z * 16 | 0xD400) << 16)  # as the kernel builds it

    def prmt(a, b, sel):  # PTX prmt default mode: byte i of d is byte sel[4i:4i+4] of {b, a}
        pool = a | (b << 32)
        return sum(((pool >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))

    def halves(v):
        return [((v >> s) & 0xFFFF).to(torch.int16).view(torch.float16).float() for s in (0, 16)]

    for A, sel in enumerate(sels):
        t = prmt(word, 0, sel)
        t = (t & 0x00F0000F) | 0x64006400  # lop3 with 0xea: (a & b) | c
        (lo, hi), (zlo, zhi) = halves(t), halves(zz)
        byte = (word >> (8 * A)) & 0xFF
        for got, q in [(lo[:, None] + zlo, byte & 15), (hi[:, None] / 16 + zhi, byte >> 4)]:
            assert torch.equal(got, (q[:, None] - z[None, :]).float()), A


def test_half2_gemv_refuses_what_it_cannot_take():
    from llmc.kernels._wq_triton import _gemv, launch

    ql = packed(64, 256, 4, 128)
    x = torch.randn(1, 256).half()
    with pytest.raises(ValueError, match="half2"):  # not CUDA (the interpreter runs no PTX)
        launch(x, ql.qweight, ql.scales, ql.qzeros, ql.g_idx, 4, 128,
               _gemv(64, 16, 8, 2, 4, half2=True))


def test_tuner_lists_per_dtype():
    """The tuner times, for each dtype, only the configs that can take it and suit it, and
    always the list's first (the reference every other config is checked against)."""
    from llmc.kernels._wq_triton import configs

    for M in (1, 4, 64):
        full = configs(M)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            some = configs(M, dtype)
            assert some[0] == full[0] and all(c in full for c in some)
        fp16, bf16 = configs(M, torch.float16), configs(M, torch.bfloat16)
        assert not any(c.kwargs.get("HALF2") or c.kwargs.get("PAIRS") for c in bf16)
        assert not any(c.kwargs.get("SWAP") and not c.kwargs.get("PAIRS") for c in fp16)
        assert any(c.kwargs.get("SWAP") for c in fp16) and any(c.kwargs.get("SWAP") for c in bf16)


def test_tuner_off_cuda_takes_the_first_config_and_reports_nothing():
    from llmc.kernels import tune
    from llmc.kernels._wq_triton import DECODE

    seen = []
    out = tune.pick(("test",), DECODE, lambda c: seen.append(c) or torch.zeros(1), cuda=False)
    assert seen == [DECODE[0]] and out.shape == (1,)
    assert repr(("test",)) not in tune.choices()


def test_wq_matmul_refuses_bad_shapes():
    ql = packed(16, 64, 4, 32)
    with pytest.raises(ValueError, match="qweight"):
        wq_matmul(torch.randn(2, 72).half(), ql.qweight, ql.scales, ql.qzeros,
                  torch.zeros(72, dtype=torch.int32), 4)


def sparse_weight(N, K, seed=0):
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    return W * nm_keep(W.abs(), 2, 4)


def test_compress_24_round_trip_and_refusals():
    W = sparse_weight(24, 96)
    W[3, :8] = 0  # groups with fewer than two non-zeros keep explicit zeros
    values, meta = compress_24(W)
    assert values.shape == (24, 48) and meta.shape == (24, 3) and meta.dtype == torch.int32
    assert torch.equal(expand_24_ref(values, meta), W)
    with pytest.raises(ValueError, match="not 2:4"):
        compress_24(torch.ones(4, 32))
    with pytest.raises(ValueError, match="divisible by 32"):
        compress_24(torch.zeros(4, 40))


@pytest.mark.parametrize("M,N,dtype", [(1, 40, torch.float16), (7, 72, torch.float16),
                                       (20, 40, torch.float32)])
def test_sparse24_matmul_matches_ref(M, N, dtype):
    W = sparse_weight(N, 160)
    values, meta = compress_24(W.to(dtype))
    x = torch.randn(M, 160, generator=torch.Generator().manual_seed(3)).to(dtype)
    ref = sparse24_matmul_ref(x, values, meta)
    close(sparse24_matmul(x, values, meta), ref, dtype)
    close(ref, (x.float() @ W.to(dtype).float().t()), dtype)


def test_sparse24_every_tuned_config():
    from llmc.kernels._sparse24_triton import DECODE, PREFILL, launch

    for N, K, ms in [(40, 192, (3, 20)), (256, 256, (1, 16))]:  # odd tiles, whole tiles
        values, meta = compress_24(sparse_weight(N, K).half())
        for M in ms:
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(4)).half()
            ref = sparse24_matmul_ref(x, values, meta)
            for cfg in DECODE + PREFILL:
                close(launch(x, values, meta, cfg), ref, torch.float16)


def test_sparse24_swapped_operand_kernel_refuses_what_it_cannot_take():
    from llmc.kernels._sparse24_triton import SWAP, launch

    values, meta = compress_24(sparse_weight(40, 192))
    with pytest.raises(ValueError, match="swapped-operand"):  # fp32 (a dot would be tf32)
        launch(torch.randn(2, 192), values, meta, SWAP[0])
    with pytest.raises(ValueError, match="swapped-operand"):  # values of another dtype
        launch(torch.randn(2, 192).half(), values.bfloat16(), meta, SWAP[0])


@pytest.mark.parametrize("gs", [32, -1, 8])
@pytest.mark.parametrize("M", [1, 20])
def test_sparse24_quant_matmul_matches_ref(M, gs):
    from llmc.kernels._sparse24_triton import PREFILL, QDECODE, launch

    N, K = 40, 160
    W = sparse_weight(N, K, seed=gs % 7)
    qw = rtn_quantize(W, QuantScheme(4, gs, False))
    ql = QuantLinear.from_quantized(qw)
    # pruned entries at their zero point, so that they dequantize to 0
    z = qw.zeros.gather(1, qw.g_idx.long()[None].expand(N, -1))
    q = torch.where(W != 0, qw.q.long(), z.long())
    Wq = torch.where(W != 0, qw.dequantize(), torch.zeros(()))
    qvalues, meta = compress_24_codes(q, Wq)
    assert torch.equal(expand_24_quant_ref(qvalues, meta, ql.scales.float(), ql.qzeros, gs),
                       torch.where(W != 0, ql.dequantize(), torch.zeros(())))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(6)).half()
    ref = sparse24_quant_matmul_ref(x, qvalues, meta, ql.scales, ql.qzeros, gs)
    close(sparse24_quant_matmul(x, qvalues, meta, ql.scales, ql.qzeros, gs), ref,
          torch.float16)
    quant = (ql.scales, ql.qzeros, K if gs == -1 else gs)
    for cfg in (QDECODE if M <= 16 else PREFILL):
        if cfg.kwargs.get("SWAP") and quant[2] % (16 * cfg.kwargs["BLOCK_W"]):
            with pytest.raises(ValueError, match="swapped-operand"):
                launch(x, qvalues, meta, cfg, quant)  # groups narrower than its K tile
            continue
        close(launch(x, qvalues, meta, cfg, quant), ref, torch.float16)


@pytest.mark.parametrize("M,N,K,gs", [(1, 256, 256, 128), (16, 136, 384, 64),
                                      (3, 128, 256, -1), (2, 72, 512, 128)])
def test_sparse24_quant_swapped_operand_kernel(M, N, K, gs):
    """The joint form's swapped-operand configs on whole and odd tiles (the shapes of
    ``test_sparse24_quant_matmul_matches_ref`` have groups narrower than their K tiles)."""
    from llmc.kernels._sparse24_triton import QSWAP, launch

    W = sparse_weight(N, K, seed=gs % 7)
    qw = rtn_quantize(W, QuantScheme(4, gs, False))
    ql = QuantLinear.from_quantized(qw)
    z = qw.zeros.gather(1, qw.g_idx.long()[None].expand(N, -1))
    qvalues, meta = compress_24_codes(torch.where(W != 0, qw.q.long(), z.long()),
                                      torch.where(W != 0, qw.dequantize(), torch.zeros(())))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(6)).half()
    ref = sparse24_quant_matmul_ref(x, qvalues, meta, ql.scales, ql.qzeros, gs)
    quant = (ql.scales, ql.qzeros, K if gs == -1 else gs)
    ran = 0
    for cfg in QSWAP:
        if quant[2] % (16 * cfg.kwargs["BLOCK_W"]) == 0:
            close(launch(x, qvalues, meta, cfg, quant), ref, torch.float16)
            ran += 1
    assert ran


def test_modules_compile_to_one_op_per_call():
    """``torch.compile(fullgraph=True)`` traces each compressed module as one custom op (no
    graph break at the launcher) and gives the eager result; an act-order ``g_idx`` takes the
    general path. The shapes allow the kernels' every-row and whole-tile paths."""
    from llmc.nn import SparseLinear, SparseQuantLinear

    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(7)).half()
    W = sparse_weight(64, 256)
    qw = rtn_quantize(W, QuantScheme(4, 128, False))
    qw.q = torch.where(W != 0, qw.q, qw.zeros.gather(1, qw.g_idx.long()[None].expand(64, -1))
                       .to(qw.q.dtype))
    modules = [packed(64, 256, 4, 128), packed(64, 256, 4, 128, act_order=True),
               SparseLinear.from_dense(W.half()), SparseQuantLinear.from_quantized(qw)]
    for m in modules:
        eager = m(x)
        torch._dynamo.reset()
        close(torch.compile(m, fullgraph=True, backend="eager")(x), eager, torch.float16)


@pytest.mark.parametrize("kind", ["float", "int"])
@pytest.mark.parametrize("shape", [(1, 8), (7, 300), (33, 1100)])
def test_per_token_activation_quantization(interpret, kind, shape):
    """The Triton per-token quantizer (FP8 rounded to nearest even in the kernel, INT8) equals
    its reference, zero rows and odd widths included."""
    from llmc.kernels.act_quant import quant_per_token, quant_per_token_ref

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * torch.logspace(-4, 1, shape[1])).bfloat16()
    x[0] = 0
    q, s = quant_per_token(x, kind)
    qr, sr = quant_per_token_ref(x, kind)
    assert q.dtype == qr.dtype and torch.equal(q.float(), qr.float()) and torch.equal(s, sr)
