"""The Triton kernels against their ``*_ref`` twins under ``TRITON_INTERPRET=1`` on CPU: small
odd shapes (K and N not multiples of the tiles, a narrow last group, act-order ``g_idx``), both
launch configurations and split-K."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmc.kernels.sparse24 import (
    compress_24,
    expand_24_ref,
    sparse24_matmul,
    sparse24_matmul_ref,
)
from llmc.kernels.wq_matmul import wq_matmul, wq_matmul_ref
from llmc.nn import QuantLinear
from llmc.prune.masks import nm_keep
from llmc.quant.rtn import rtn_quantize
from llmc.quant.scheme import QuantScheme

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
    """fp32: accumulation-order noise; fp16: a few ulps of the output's scale."""
    tol = 1e-5 if dtype == torch.float32 else 2e-3
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
    from llmc.kernels._wq_triton import launch

    ql = packed(40, 160, 4, 32, act_order=True)
    assert not ql.trivial_groups
    x = torch.randn(2, 160, generator=torch.Generator().manual_seed(2)).half()
    ref = wq_matmul_ref(x, ql.qweight, ql.scales, ql.qzeros, ql.g_idx, 4)
    close(wq_matmul(x, ql.qweight, ql.scales, ql.qzeros, ql.g_idx, 4), ref, torch.float16)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 3, "num_warps": 4,
           "num_stages": 2}
    close(launch(x, ql.qweight, ql.scales, ql.qzeros, ql.g_idx, 4, None, cfg), ref,
          torch.float16)


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


def test_sparse24_split_k():
    from llmc.kernels._sparse24_triton import launch

    values, meta = compress_24(sparse_weight(40, 192).half())
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(4)).half()
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4,
           "num_stages": 2}
    close(launch(x, values, meta, cfg), sparse24_matmul_ref(x, values, meta), torch.float16)
