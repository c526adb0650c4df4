"""2:4 sparse weights stored compressed, and their matmul ``y = x @ W^T``.

A 2:4 weight W [N, K] keeps at most 2 of every 4 consecutive inputs of a row. Compressed:
``values`` [N, K/2] (the two kept entries of each group, in column order, in W's dtype) and
``meta`` int32 [N, K/32]: the 2-bit position in its group (0..3) of each kept value, 16 per
word, lowest bits first. A group with fewer than two non-zeros keeps explicit zeros.

Triton has no sparse tensor-core instruction, so the kernel's gain is memory traffic: it loads
the compressed form (half the values plus 1/8 of their size in positions) and expands it in
registers, which pays at decode-sized M. For large M on a GPU that supports it,
:class:`llmc.nn.SparseLinear` hands off to ``torch.sparse.to_sparse_semi_structured``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmc.kernels import use_triton


def compress_24(W: Tensor) -> tuple[Tensor, Tensor]:
    """Dense 2:4 ``W`` [N, K] -> (values [N, K/2], meta int32 [N, K/32]); refuses a weight
    that is not 2:4 or whose K is not a multiple of 32."""
    N, K = W.shape
    if K % 32:
        raise ValueError(f"2:4 storage needs K divisible by 32, got {K}")
    groups = W.reshape(N, K // 4, 4)
    nonzero = groups != 0
    if (nonzero.sum(-1) > 2).any():
        raise ValueError("the weight is not 2:4 sparse (a group of 4 holds more than 2 "
                         "non-zeros)")
    # The kept positions: the non-zeros first (stable, in column order), padded with zeros.
    order = torch.sort((~nonzero).to(torch.int8), dim=-1, stable=True).indices[..., :2]
    pos = torch.sort(order, dim=-1).values  # (N, K/4, 2) ascending column order
    values = torch.gather(groups, -1, pos).reshape(N, K // 2)
    p = pos.reshape(N, K // 32, 16).to(torch.int64)
    shifts = torch.arange(16, dtype=torch.int64) * 2
    words = (p << shifts).sum(-1)
    meta = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return values.contiguous(), meta.contiguous()


def expand_24_ref(values: Tensor, meta: Tensor) -> Tensor:
    """(values [N, K/2], meta [N, K/32]) -> the dense W [N, K]."""
    N, half = values.shape
    K = half * 2
    shifts = torch.arange(16, dtype=torch.int64, device=meta.device) * 2
    pos = ((meta.to(torch.int64)[..., None] >> shifts) & 3).reshape(N, K // 4, 2)
    dense = torch.zeros(N, K // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.reshape(N, K // 4, 2))
    return dense.reshape(N, K)


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
