"""2:4 sparse weights stored compressed, and their matmul ``y = x @ W^T``; also the joint
2:4 + INT4 form.

A 2:4 weight W [N, K] keeps at most 2 of every 4 consecutive inputs of a row. Compressed:
``values`` [N, K/2] (the two kept entries of each group, in column order, in W's dtype) and
``meta`` int32 [N, K/32]: the 2-bit position in its group (0..3) of each kept value, 16 per
word, lowest bits first. A group with fewer than two non-zeros keeps explicit zeros.

Joint 2:4 + INT4: the kept entries as 4-bit codes, ``qvalues`` int32 [K/16, N] (the kept
slots packed 8 per word along K/2, lowest bits first: the GPTQ ``qweight`` layout over the
slots), with GPTQ ``scales`` [G, N] and ``qzeros`` [G, N/8] over groups of ``group_size``
*input* columns (a multiple of 4, or -1 for one group per row), and the positions transposed,
``meta`` int32 [K/32, N], so that every tensor of the form is read along N. A pruned entry's
code is its zero point, so it dequantizes to exactly 0.

Triton has no sparse tensor-core instruction, so the kernels' gain is memory traffic: they
load the compressed form and expand it in registers, which pays at decode-sized M. For large
M on a GPU that supports it, :class:`llmc.nn.SparseLinear` hands off to
``torch.sparse.to_sparse_semi_structured``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmc.core.masks import nm_slots
from llmc.core.pack import pack_rows, to_int32, unpack_cols, unpack_rows
from llmc.kernels import use_triton


def _pack_meta(pos: Tensor) -> Tensor:
    """Positions long [N, K/4, 2] -> int32 [N, K/32], 16 two-bit fields per word."""
    N = pos.shape[0]
    p = pos.reshape(N, -1, 16)
    shifts = torch.arange(16, dtype=torch.int64, device=pos.device) * 2
    words = (p << shifts).sum(-1)
    return to_int32(words).contiguous()


def _unpack_meta(meta: Tensor) -> Tensor:
    """int32 [N, K/32] -> positions long [N, K/4, 2]."""
    N = meta.shape[0]
    shifts = torch.arange(16, dtype=torch.int64, device=meta.device) * 2
    return ((meta.to(torch.int64)[..., None] >> shifts) & 3).reshape(N, -1, 2)


def _check_k(K: int) -> None:
    if K % 32:
        raise ValueError(f"2:4 storage needs K divisible by 32, got {K}")


def compress_24(W: Tensor) -> tuple[Tensor, Tensor]:
    """Dense 2:4 ``W`` [N, K] -> (values [N, K/2], meta int32 [N, K/32]); refuses a weight
    that is not 2:4 or whose K is not a multiple of 32."""
    N, K = W.shape
    _check_k(K)
    pos = nm_slots(W, 2, 4)
    values = torch.gather(W.reshape(N, K // 4, 4), -1, pos).reshape(N, K // 2)
    return values.contiguous(), _pack_meta(pos)


def expand_24_ref(values: Tensor, meta: Tensor) -> Tensor:
    """(values [N, K/2], meta [N, K/32]) -> the dense W [N, K]."""
    N, half = values.shape
    dense = torch.zeros(N, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, _unpack_meta(meta), values.reshape(N, half // 2, 2))
    return dense.reshape(N, half * 2)


def sparse24_matmul_ref(x: Tensor, values: Tensor, meta: Tensor) -> Tensor:
    """``x [..., K] @ W^T`` with fp32 accumulation, in plain torch."""
    W = expand_24_ref(values, meta)
    return (x.float() @ W.t().float().to(x.device)).to(x.dtype)


def sparse24_matmul(x: Tensor, values: Tensor, meta: Tensor) -> Tensor:
    """``x [..., K] @ W^T -> [..., N]``: the Triton kernel on CUDA (or under
    ``TRITON_INTERPRET=1``), :func:`sparse24_matmul_ref` elsewhere."""
    N, half = values.shape
    if x.shape[-1] != 2 * half or meta.shape != (N, half // 16) or meta.dtype != torch.int32:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, values {tuple(values.shape)}"
                         f", meta {meta.dtype} {tuple(meta.shape)}")
    if not use_triton(x.device.type):
        return sparse24_matmul_ref(x, values, meta)
    from llmc.kernels._sparse24_triton import launch

    lead = x.shape[:-1]
    out = launch(x.reshape(-1, x.shape[-1]), values, meta)
    return out.reshape(*lead, N)


# The joint 2:4 + INT4 form.

def compress_24_codes(q: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """4-bit codes ``q`` [N, K] of a 2:4 weight whose dequantized form is ``W`` [N, K] ->
    (qvalues int32 [K/16, N], meta int32 [K/32, N]); the stored positions come from W's
    non-zeros."""
    N, K = W.shape
    _check_k(K)
    pos = nm_slots(W, 2, 4)
    kept = torch.gather(q.to(torch.int64).reshape(N, K // 4, 4), -1, pos).reshape(N, K // 2)
    return pack_rows(kept.t().contiguous(), 4), _pack_meta(pos).t().contiguous()


def _group_of_slots(K: int, group_size: int, device) -> Tensor:
    """The quantization group of each kept slot [K/2] (the group of its 4-input block)."""
    gs = K if group_size == -1 else group_size
    return (torch.arange(K // 2, device=device) // 2 * 4) // gs


def expand_24_quant_ref(qvalues: Tensor, meta: Tensor, scales: Tensor, qzeros: Tensor,
                        group_size: int) -> Tensor:
    """The joint form's dense W [N, K] in fp32 (``meta`` [K/32, N])."""
    K, N = meta.shape[0] * 32, meta.shape[1]
    codes = unpack_rows(qvalues, 4, K // 2).t()  # [N, K/2]
    g = _group_of_slots(K, group_size, meta.device)
    z = unpack_cols(qzeros, 4, N).t()[:, g]  # [N, K/2]
    vals = (codes - z).float() * scales.float().t()[:, g]
    dense = torch.zeros(N, K // 4, 4, dtype=torch.float32, device=meta.device)
    dense.scatter_(-1, _unpack_meta(meta.t()), vals.reshape(N, K // 4, 2))
    return dense.reshape(N, K)


def sparse24_quant_matmul_ref(x: Tensor, qvalues: Tensor, meta: Tensor, scales: Tensor,
                              qzeros: Tensor, group_size: int) -> Tensor:
    W = expand_24_quant_ref(qvalues, meta, scales, qzeros, group_size)
    return (x.float() @ W.t().to(x.device)).to(x.dtype)


def sparse24_quant_matmul(x: Tensor, qvalues: Tensor, meta: Tensor, scales: Tensor,
                          qzeros: Tensor, group_size: int) -> Tensor:
    """``x [..., K] @ W^T -> [..., N]`` for the joint 2:4 + INT4 form: the Triton kernel on
    CUDA (or under ``TRITON_INTERPRET=1``), :func:`sparse24_quant_matmul_ref` elsewhere."""
    N = meta.shape[1]
    K = x.shape[-1]
    if (meta.shape != (K // 32, N) or qvalues.shape != (K // 16, N)
            or qvalues.dtype != torch.int32 or scales.shape[1] != N):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, qvalues "
                         f"{tuple(qvalues.shape)}, meta {tuple(meta.shape)}, scales "
                         f"{tuple(scales.shape)}")
    if group_size != -1 and group_size % 4:
        raise ValueError(f"the joint 2:4 form needs group_size a multiple of 4, got "
                         f"{group_size}")
    if not use_triton(x.device.type):
        return sparse24_quant_matmul_ref(x, qvalues, meta, scales, qzeros, group_size)
    from llmc.kernels._sparse24_triton import launch

    lead = x.shape[:-1]
    gs = K if group_size == -1 else group_size
    out = launch(x.reshape(-1, K).to(scales.dtype), qvalues, meta,
                 quant=(scales, qzeros, gs))
    return out.reshape(*lead, N).to(x.dtype)
