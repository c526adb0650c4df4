"""The Triton kernel of :mod:`llmc.kernels.wq_matmul` (imported only where Triton is)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from llmc.kernels._triton_common import TWO23, _code_plus_2p23, _qparams, _write_out
from llmc.kernels.tune import Config, atomic_out, finish_out, pick

# How the group of a weight row is found: the whole K tile lies in one group (scales and zero
# points loaded once per tile and applied after the dot); the rows of one packed word share a
# group (k // group_size); or any g_idx (act order), looked up per row.
TILE = tl.constexpr(0)  # constexpr: jitted code may read no other globals
WORD = tl.constexpr(1)
ROW = tl.constexpr(2)


@triton.jit
def _wq_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_om, stride_on,
    GROUP_SIZE,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUPS: tl.constexpr, SPLIT_DOT: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile over K tiles of BLOCK_W packed words (BLOCK_W *
    32 // BITS rows of W). SPLIT_DOT: each word row is loaded once and the tile is reduced as
    32 // BITS dots, one per code position in the word (x gathered with that stride);
    otherwise the codes are unpacked to a (BLOCK_K, BLOCK_N) tile (each word loaded once per
    code, from L1) for one dot."""
    PER_WORD: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    BLOCK_K: tl.constexpr = BLOCK_W * PER_WORD
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    z_shift = (offs_n % PER_WORD) * BITS
    KW = (K + PER_WORD - 1) // PER_WORD
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        if GROUPS == TILE:
            s, z = _qparams(s_ptr, z_ptr, k0 // GROUP_SIZE, offs_n, n_ok, z_shift, stride_sg,
                            stride_sn, stride_zg, stride_zn, MAXQ, PER_WORD)
        if SPLIT_DOT:
            offs_w = k0 // PER_WORD + tl.arange(0, BLOCK_W)  # word rows (BW,)
            w_ok = offs_w < KW
            qw = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                         mask=w_ok[:, None] & n_ok[None, :], other=0)  # (BW, BN) int32
            if GROUPS == WORD:
                s, z = _qparams(s_ptr, z_ptr, (offs_w * PER_WORD // GROUP_SIZE)[:, None],
                                offs_n[None, :], w_ok[:, None] & n_ok[None, :],
                                z_shift[None, :], stride_sg, stride_sn, stride_zg, stride_zn,
                                MAXQ, PER_WORD)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(PER_WORD):
                offs_k = offs_w * PER_WORD + j
                k_ok = offs_k < K
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BW)
                q = (qw >> (j * BITS)) & MAXQ
                if GROUPS == TILE:
                    part += tl.dot(x, (q - z[None, :]).to(x.dtype))
                else:
                    if GROUPS == ROW:
                        g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
                        s, z = _qparams(s_ptr, z_ptr, g[:, None], offs_n[None, :],
                                        k_ok[:, None] & n_ok[None, :], z_shift[None, :],
                                        stride_sg, stride_sn, stride_zg, stride_zn, MAXQ,
                                        PER_WORD)
                    part += tl.dot(x, ((q - z).to(tl.float32) * s).to(x.dtype))
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
            qw = tl.load(qw_ptr + (offs_k[:, None] // PER_WORD) * stride_qk
                         + offs_n[None, :] * stride_qn,
                         mask=k_ok[:, None] & n_ok[None, :], other=0)  # (BK, BN)
            q = (qw >> ((offs_k[:, None] % PER_WORD) * BITS)) & MAXQ
            if GROUPS == TILE:
                part = tl.dot(x, (q - z[None, :]).to(x.dtype))
            else:
                g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
                s, z = _qparams(s_ptr, z_ptr, g[:, None], offs_n[None, :],
                                k_ok[:, None] & n_ok[None, :], z_shift[None, :], stride_sg,
                                stride_sn, stride_zg, stride_zn, MAXQ, PER_WORD)
                part = tl.dot(x, ((q - z).to(tl.float32) * s).to(x.dtype))
        if GROUPS == TILE:
            acc += part * s[None, :]  # integer dot, then the tile's one scale
        else:
            acc += part
    _write_out(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc,
               m_ok[:, None] & n_ok[None, :], SPLIT_K)


@triton.jit
def _wq_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_om, stride_on,
    GROUP_SIZE,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """Decode-sized M on CUDA cores: one row of x per program (grid axis 2), BLOCK_N output
    columns, K tiles of BLOCK_W packed words loaded once along N (coalesced). Codes become
    floats by the exponent trick (no int-to-float conversion), the products accumulate
    elementwise in fp32 and are reduced over K once at the end."""
    PER_WORD: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    z_shift = (offs_n % PER_WORD) * BITS
    KW = (K + PER_WORD - 1) // PER_WORD
    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    for w0 in range(pid_k * BLOCK_W, KW, BLOCK_W * SPLIT_K):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        w_ok = offs_w < KW
        mask = w_ok[:, None] & n_ok[None, :]
        qw = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                     mask=mask, other=0)
        if GROUPS == TILE:
            s, z = _qparams(s_ptr, z_ptr, w0 * PER_WORD // GROUP_SIZE, offs_n, n_ok, z_shift,
                            stride_sg, stride_sn, stride_zg, stride_zn, MAXQ, PER_WORD)
            c = (z.to(tl.float32) + TWO23)[None, :]
        elif GROUPS == WORD:
            s, z = _qparams(s_ptr, z_ptr, (offs_w * PER_WORD // GROUP_SIZE)[:, None],
                            offs_n[None, :], mask, z_shift[None, :], stride_sg, stride_sn,
                            stride_zg, stride_zn, MAXQ, PER_WORD)
            c = z.to(tl.float32) + TWO23
        part = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(PER_WORD):
            offs_k = offs_w * PER_WORD + j
            k_ok = offs_k < K
            xj = tl.load(x_ptr + m * stride_xm + offs_k * stride_xk, mask=k_ok,
                         other=0.0).to(tl.float32)
            f = _code_plus_2p23(qw, j * BITS, MAXQ)
            if GROUPS == ROW:
                g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
                s, z = _qparams(s_ptr, z_ptr, g[:, None], offs_n[None, :],
                                k_ok[:, None] & n_ok[None, :], z_shift[None, :], stride_sg,
                                stride_sn, stride_zg, stride_zn, MAXQ, PER_WORD)
                part += xj[:, None] * ((f - (z.to(tl.float32) + TWO23)) * s)
            else:
                part += xj[:, None] * (f - c)
        if GROUPS == ROW:
            acc += part
        elif GROUPS == TILE:
            acc += part * s[None, :]
        else:
            acc += part * s
    _write_out(out_ptr + m * stride_om + offs_n * stride_on, tl.sum(acc, axis=0), n_ok, SPLIT_K)


def _cfg(bm, bn, bw, split, warps, stages, split_dot=True) -> Config:
    return Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw, SPLIT_K=split,
                       SPLIT_DOT=split_dot), warps, stages)


def _gemv(bn, bw, split, warps, stages) -> Config:
    return Config(dict(GEMV=True, BLOCK_N=bn, BLOCK_W=bw, SPLIT_K=split), warps, stages)


# The short fixed lists the tuner times on CUDA (the first of each is the default elsewhere).
# BLOCK_W words are BLOCK_W * 32 // bits rows of K; a split dot needs BLOCK_W >= 16.
DECODE = [
    _gemv(128, 16, 4, 4, 3), _gemv(256, 16, 2, 8, 3), _gemv(128, 16, 8, 4, 3),
    _gemv(64, 16, 8, 2, 4), _gemv(256, 8, 4, 4, 4), _gemv(64, 32, 8, 2, 3),
    _gemv(128, 32, 8, 4, 3), _gemv(32, 16, 16, 1, 3),
    _cfg(16, 64, 16, 4, 4, 3), _cfg(16, 128, 16, 2, 4, 3), _cfg(16, 64, 16, 1, 4, 4),
    _cfg(16, 32, 16, 1, 2, 4), _cfg(16, 64, 32, 2, 4, 3), _cfg(16, 128, 16, 4, 8, 3),
    _cfg(16, 64, 8, 4, 4, 4, False),
]
PREFILL = [
    _cfg(64, 128, 4, 1, 4, 3, False), _cfg(128, 128, 8, 1, 8, 3, False),
    _cfg(64, 64, 8, 1, 4, 4, False), _cfg(64, 128, 16, 1, 4, 3), _cfg(128, 128, 16, 1, 8, 3),
]


def configs(M: int) -> list[Config]:
    return DECODE if M <= 16 else PREFILL


def _groups(K: int, bits: int, group_size: int | None, block_w: int) -> int:
    per_word = 32 // bits
    if not group_size:
        return ROW.value
    if group_size % (block_w * per_word) == 0:
        return TILE.value
    return (WORD if group_size % per_word == 0 else ROW).value


def launch(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
           bits: int, group_size: int | None, cfg: Config | None = None) -> Tensor:
    """Check-free launch on a 2-D ``x`` [M, K] (the wrapper checked the shapes). ``cfg``:
    one config (tests); else the tuner's pick from :func:`configs` (timed once per shape on
    CUDA, the first of the list elsewhere)."""
    M, K = x.shape
    N = scales.shape[1]

    def run(c: Config) -> Tensor:
        kw = dict(c.kwargs)
        if kw.pop("GEMV", False):
            split = kw.pop("SPLIT_K")
            out = atomic_out(M, N, x, split)
            _wq_gemv_kernel[(triton.cdiv(N, kw["BLOCK_N"]), split, M)](
                x, qweight, scales, qzeros, g_idx, out, M, N, K,
                x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
                scales.stride(0), scales.stride(1), qzeros.stride(0), qzeros.stride(1),
                out.stride(0), out.stride(1), group_size or 1,
                BITS=bits, SPLIT_K=split, GROUPS=_groups(K, bits, group_size, kw["BLOCK_W"]),
                num_warps=c.num_warps, num_stages=c.num_stages, **kw,
            )
            return finish_out(out, x)
        if kw["SPLIT_DOT"] and kw["BLOCK_W"] < 16:
            raise ValueError("a split dot needs BLOCK_W >= 16")
        split = kw.pop("SPLIT_K")
        out = atomic_out(M, N, x, split)
        grid = (triton.cdiv(M, kw["BLOCK_M"]), triton.cdiv(N, kw["BLOCK_N"]), split)
        _wq_matmul_kernel[grid](
            x, qweight, scales, qzeros, g_idx, out, M, N, K,
            x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
            scales.stride(0), scales.stride(1), qzeros.stride(0), qzeros.stride(1),
            out.stride(0), out.stride(1), group_size or 1,
            BITS=bits, SPLIT_K=split, GROUPS=_groups(K, bits, group_size, kw["BLOCK_W"]),
            num_warps=c.num_warps, num_stages=c.num_stages, **kw,
        )
        return finish_out(out, x)

    if cfg is not None:
        return run(cfg)
    key = ("wq", M, K, N, bits, group_size, x.dtype)
    return pick(key, configs(M), run, x.is_cuda)
