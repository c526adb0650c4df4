"""The kernels as PyTorch custom ops (``torch.ops.llmc.*``), so that ``torch.compile`` treats
each call as one opaque op with a known output shape instead of tracing into the launcher
(whose config tuning, caches and Triton launch it cannot trace: a graph break per Linear).
The modules of :mod:`llmc.nn` call these only while being compiled; eager calls go straight
to the functions, without the dispatcher's overhead."""

from __future__ import annotations

import torch
from torch import Tensor

from llmc.kernels.native import NativeInt4, native_matmul
from llmc.kernels.sparse24 import sparse24_matmul, sparse24_quant_matmul
from llmc.kernels.wq_matmul import wq_matmul


@torch.library.custom_op("llmc::wq_matmul", mutates_args=())
def wq_matmul_op(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
                 bits: int, group_size: int) -> Tensor:
    """:func:`llmc.kernels.wq_matmul.wq_matmul`; ``group_size`` 0 for None."""
    return wq_matmul(x, qweight, scales, qzeros, g_idx, bits, group_size or None)


@wq_matmul_op.register_fake
def _(x, qweight, scales, qzeros, g_idx, bits, group_size):
    return x.new_empty(*x.shape[:-1], scales.shape[1])


@torch.library.custom_op("llmc::sparse24_matmul", mutates_args=())
def sparse24_matmul_op(x: Tensor, values: Tensor, meta: Tensor) -> Tensor:
    """:func:`llmc.kernels.sparse24.sparse24_matmul`."""
    return sparse24_matmul(x, values, meta)


@sparse24_matmul_op.register_fake
def _(x, values, meta):
    return x.new_empty(*x.shape[:-1], values.shape[0])


@torch.library.custom_op("llmc::sparse24_quant_matmul", mutates_args=())
def sparse24_quant_matmul_op(x: Tensor, qvalues: Tensor, meta: Tensor, scales: Tensor,
                             qzeros: Tensor, group_size: int) -> Tensor:
    """:func:`llmc.kernels.sparse24.sparse24_quant_matmul`."""
    return sparse24_quant_matmul(x, qvalues, meta, scales, qzeros, group_size)


@sparse24_quant_matmul_op.register_fake
def _(x, qvalues, meta, scales, qzeros, group_size):
    return x.new_empty(*x.shape[:-1], meta.shape[1])


@torch.library.custom_op("llmc::native_matmul", mutates_args=())
def native_matmul_op(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor,
                     perm: Tensor | None, meta: Tensor | None, out_features: int,
                     in_features: int, group_size: int) -> Tensor:
    """:func:`llmc.kernels.native.native_matmul` on a :class:`NativeInt4`'s fields."""
    return native_matmul(x, NativeInt4(words, scales, zeros, perm, out_features, in_features,
                                       group_size, meta=meta))


@native_matmul_op.register_fake
def _(x, words, scales, zeros, perm, meta, out_features, in_features, group_size):
    return x.new_empty(*x.shape[:-1], out_features)


def native_op(x: Tensor, w: NativeInt4) -> Tensor:
    """:func:`native_matmul_op` on ``w``."""
    return native_matmul_op(x, w.words, w.scales, w.zeros, w.perm, w.meta, w.out_features,
                            w.in_features, w.group_size)
