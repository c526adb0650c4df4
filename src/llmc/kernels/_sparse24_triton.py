"""The Triton kernel of :mod:`llmc.kernels.sparse24` (imported only where Triton is): 2:4
weights as kept values (fp16/bf16/fp32, or 4-bit codes with group scales and zero points) plus
2-bit positions, expanded in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmc.kernels._swap_triton import _sparse24_swap_kernel, _sparse24q_swap_kernel
from llmc.kernels._triton_common import TWO23, _code_plus_2p23, _qparams, _tile, _write_out
from llmc.kernels.tune import Config, atomic_out, finish_out, pick, swap_enabled


@triton.jit
def _sparse24_matmul_kernel(
    x_ptr, v_ptr, meta_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_vs, stride_vn, stride_mn, stride_mk, stride_sg, stride_sn,
    stride_zg, stride_zn, stride_om, stride_on,
    GROUP_SIZE,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    SPLIT_K: tl.constexpr, QUANT: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile over K tiles of BLOCK_G groups of 4 inputs. Each
    group's two kept values (slots 2g, 2g + 1) and their positions are loaded once; the tile is
    reduced as four dots, one per position in the group, with x gathered at stride 4.

    Values: QUANT=False, ``v`` [slots, N] by strides (the [N, K/2] values tensor); QUANT=True,
    4-bit codes packed 8 per int32 along the slots, ``v`` [K/16, N], dequantized as
    ``(q - z) * s`` with the group of input column ``k`` being ``k // GROUP_SIZE``."""
    offs_m, offs_n, m_ok, n_ok, pid_k = _tile(M, N, BLOCK_M, BLOCK_N)
    G4 = K // 4  # groups of four inputs (K is a multiple of 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(pid_k * BLOCK_G, G4, BLOCK_G * SPLIT_K):
        offs_g = g0 + tl.arange(0, BLOCK_G)  # (BG,)
        mask = (offs_g < G4)[:, None] & n_ok[None, :]
        word = tl.load(meta_ptr + offs_n[None, :] * stride_mn + (offs_g // 8)[:, None]
                       * stride_mk, mask=mask, other=0)  # slots 2g, 2g + 1: bits 4(g % 8)..
        shift = ((offs_g % 8) * 4)[:, None]
        p0 = (word >> shift) & 3
        p1 = (word >> (shift + 2)) & 3
        if QUANT:
            codes = tl.load(v_ptr + (offs_g // 4)[:, None] * stride_vs + offs_n[None, :]
                            * stride_vn, mask=mask, other=0)  # 8 slots = 4 groups per word
            c_shift = ((offs_g % 4) * 8)[:, None]
            s, z = _qparams(s_ptr, z_ptr, ((offs_g * 4) // GROUP_SIZE)[:, None], offs_n[None, :],
                            mask, ((offs_n % 8) * 4)[None, :], stride_sg, stride_sn, stride_zg,
                            stride_zn, 15, 8)
            v0 = (((codes >> c_shift) & 15) - z).to(tl.float32) * s
            v1 = (((codes >> (c_shift + 4)) & 15) - z).to(tl.float32) * s
        else:
            v0 = tl.load(v_ptr + (2 * offs_g)[:, None] * stride_vs + offs_n[None, :] * stride_vn,
                         mask=mask, other=0.0)  # (BG, BN)
            v1 = tl.load(v_ptr + (2 * offs_g + 1)[:, None] * stride_vs
                         + offs_n[None, :] * stride_vn, mask=mask, other=0.0)
        for pos in tl.static_range(4):
            offs_k = offs_g * 4 + pos
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)  # (BM, BG)
            w = tl.where(p0 == pos, v0, tl.where(p1 == pos, v1, 0.0))
            acc += tl.dot(x, w.to(x.dtype))
    _write_out(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc,
               m_ok[:, None] & n_ok[None, :], SPLIT_K)


@triton.jit
def _sparse24_gemv_kernel(
    x_ptr, v_ptr, meta_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_vn, stride_vs, stride_mn, stride_mk, stride_om, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Decode-sized M, fp16 values [N, K/2] and meta [N, K/32]: one row of x per program (grid
    axis 2), BLOCK_N weight rows, K tiles of BLOCK_G groups of four loaded along the rows
    (coalesced); x is gathered at each kept value's position, products accumulate elementwise
    in fp32 and are reduced once at the end."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    G4 = K // 4
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for g0 in range(pid_k * BLOCK_G, G4, BLOCK_G * SPLIT_K):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        mask = n_ok[:, None] & (offs_g < G4)[None, :]
        offs_s = 2 * g0 + tl.arange(0, 2 * BLOCK_G)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_s[None, :] * stride_vs,
                    mask=n_ok[:, None] & (offs_s < 2 * G4)[None, :], other=0.0)
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_G, 2)))
        word = tl.load(meta_ptr + offs_n[:, None] * stride_mn + (offs_g // 8)[None, :]
                       * stride_mk, mask=mask, other=0)
        shift = ((offs_g % 8) * 4)[None, :]
        xb = x_ptr + m * stride_xm + (offs_g * 4)[None, :] * stride_xk
        x0 = tl.load(xb + ((word >> shift) & 3) * stride_xk, mask=mask, other=0.0)
        x1 = tl.load(xb + ((word >> (shift + 2)) & 3) * stride_xk, mask=mask, other=0.0)
        acc += v0.to(tl.float32) * x0.to(tl.float32) + v1.to(tl.float32) * x1.to(tl.float32)
    _write_out(out_ptr + m * stride_om + offs_n * stride_on, tl.sum(acc, axis=1), n_ok, SPLIT_K)


@triton.jit
def _sparse24q_gemv_kernel(
    x_ptr, qv_ptr, meta_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qw, stride_qn, stride_mk, stride_mn, stride_sg, stride_sn,
    stride_zg, stride_zn, stride_om, stride_on,
    GROUP_SIZE,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
    WORD_GROUPS: tl.constexpr,
):
    """Decode-sized M, the joint form: 4-bit codes [K/16, N] and meta [K/32, N], both loaded
    along N (coalesced). Word row w holds slots 8w..8w+7, i.e. the groups of four 4w..4w+3
    (inputs 16w..16w+15) and its positions sit in meta row w // 2. WORD_GROUPS: a word row
    lies in one quantization group (group_size a multiple of 16)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    z_shift = ((offs_n % 8) * 4)[None, :]
    KW = K // 16
    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    for w0 in range(pid_k * BLOCK_W, KW, BLOCK_W * SPLIT_K):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        mask = (offs_w < KW)[:, None] & n_ok[None, :]
        qw = tl.load(qv_ptr + offs_w[:, None] * stride_qw + offs_n[None, :] * stride_qn,
                     mask=mask, other=0)
        mw = tl.load(meta_ptr + (offs_w // 2)[:, None] * stride_mk + offs_n[None, :]
                     * stride_mn, mask=mask, other=0)
        if WORD_GROUPS:
            s, z = _qparams(s_ptr, z_ptr, (offs_w * 16 // GROUP_SIZE)[:, None], offs_n[None, :],
                            mask, z_shift, stride_sg, stride_sn, stride_zg, stride_zn, 15, 8)
            c = z.to(tl.float32) + TWO23
        part = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            g = offs_w * 4 + j // 2  # group of four of slot 8w + j
            p = (mw >> ((g % 8) * 4 + (j % 2) * 2)[:, None]) & 3
            xk = tl.load(x_ptr + m * stride_xm + ((g * 4)[:, None] + p) * stride_xk, mask=mask,
                         other=0.0).to(tl.float32)
            f = _code_plus_2p23(qw, j * 4, 15)
            if WORD_GROUPS:
                part += xk * (f - c)
            else:
                s, z = _qparams(s_ptr, z_ptr, (g * 4 // GROUP_SIZE)[:, None], offs_n[None, :],
                                mask, z_shift, stride_sg, stride_sn, stride_zg, stride_zn, 15, 8)
                part += xk * ((f - (z.to(tl.float32) + TWO23)) * s)
        if WORD_GROUPS:
            acc += part * s
        else:
            acc += part
    _write_out(out_ptr + m * stride_om + offs_n * stride_on, tl.sum(acc, axis=0), n_ok, SPLIT_K)


def _cfg(bm, bn, bg, split, warps, stages) -> Config:
    return Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_G=bg, SPLIT_K=split), warps, stages)


def _gemv(bn, bg, split, warps, stages) -> Config:
    """fp16 values: BLOCK_N weight rows x BLOCK_G groups of four; joint form: BLOCK_N columns
    x BLOCK_G // 4 word rows (BLOCK_G groups of four)."""
    return Config(dict(GEMV=True, BLOCK_N=bn, BLOCK_G=bg, SPLIT_K=split), warps, stages)


def _swap(bn, bg, split, warps, stages) -> Config:
    """The swapped-operand kernel (fp16/bf16 values): BLOCK_N weight rows (at least 32 per
    warp, which keeps the weight tile in registers) x BLOCK_G groups of four."""
    return Config(dict(SWAP=True, BLOCK_N=bn, BLOCK_G=bg, SPLIT_K=split), warps, stages)


# The tuner's short lists (the first of each is the default off CUDA); BLOCK_G >= 16 groups of
# four inputs per K tile (a dot needs K >= 16). GEMVs for M <= 8, tiles above; the
# swapped-operand configs for every M <= 16.
GEMVS = [_gemv(8, 128, 4, 4, 3), _gemv(16, 64, 4, 4, 3), _gemv(4, 256, 4, 4, 3),
         _gemv(8, 256, 8, 4, 3)]
TILES = [_cfg(16, 64, 32, 2, 4, 3), _cfg(16, 64, 16, 4, 4, 3), _cfg(16, 32, 16, 1, 2, 4),
         _cfg(16, 128, 32, 4, 8, 3)]
SWAP = [_swap(128, 32, 4, 4, 3), _swap(128, 32, 2, 4, 3), _swap(128, 32, 8, 4, 3),
        _swap(256, 32, 4, 8, 3), _swap(128, 16, 4, 4, 4)]
# The joint form's swapped-operand kernel: BLOCK_W words of codes (16 inputs each) per K tile.
QSWAP = [Config(dict(SWAP=True, BLOCK_N=bn, BLOCK_W=bw, SPLIT_K=split), warps, stages)
         for bn, bw, split, warps, stages in [(128, 8, 4, 4, 3), (128, 8, 2, 4, 3),
                                              (128, 8, 8, 4, 3), (128, 4, 4, 4, 4)]]
DECODE = GEMVS + TILES + SWAP
PREFILL = [_cfg(64, 128, 16, 1, 4, 3), _cfg(128, 128, 16, 1, 8, 3), _cfg(64, 64, 32, 1, 4, 3)]
# The joint form's GEMV runs along N: wider column blocks.
QGEMVS = [_gemv(128, 32, 8, 4, 3), _gemv(64, 64, 8, 2, 4), _gemv(128, 64, 4, 4, 3),
          _gemv(64, 64, 16, 2, 3)]
QDECODE = QGEMVS + TILES + QSWAP


def configs(M: int, quant: bool = False) -> list[Config]:
    if M > 16:
        return PREFILL
    swap = (QSWAP if quant else SWAP) if swap_enabled() else []
    return TILES + swap if M > 8 else (QGEMVS if quant else GEMVS) + TILES[:1] + swap


def launch(x: Tensor, values: Tensor, meta: Tensor, cfg: Config | None = None,
           quant: tuple[Tensor, Tensor, int] | None = None) -> Tensor:
    """``x`` [M, K] times a 2:4 weight: ``values`` [N, K/2] kept values with ``meta``
    [N, K/32]; or, with ``quant = (scales [G, N], qzeros [G, N/8], group_size)``, int32
    [K/16, N] of 4-bit codes with ``meta`` [K/32, N]."""
    M, K = x.shape
    if quant is None:
        N = values.shape[0]
        s = z = values  # unused pointers
        vs = (values.stride(1), values.stride(0))  # (slot, row) strides
        ms = (meta.stride(1), meta.stride(0))  # (k, n)
        qs = (0, 0, 0, 0)
        group_size = 1
    else:
        N = values.shape[1]
        s, z, group_size = quant
        vs = (values.stride(0), values.stride(1))
        ms = (meta.stride(0), meta.stride(1))
        qs = (s.stride(0), s.stride(1), z.stride(0), z.stride(1))

    def run(c: Config) -> Tensor:
        kw = dict(c.kwargs)
        split = kw.pop("SPLIT_K")
        opts = {"num_warps": c.num_warps, "num_stages": c.num_stages}
        swap = kw.pop("SWAP", False)
        if swap and quant is not None:
            if "BLOCK_W" not in kw or x.dtype not in (torch.float16, torch.bfloat16) \
                    or group_size % (16 * kw["BLOCK_W"]) or meta.stride(1) != 1:
                raise ValueError("the swapped-operand joint 2:4 + INT4 kernel takes fp16 or "
                                 "bf16 x, groups of whole K tiles and meta rows contiguous")
            out = atomic_out(M, N, x, split)
            m16 = meta.view(torch.int16)  # a word's four groups' positions in one half
            grid = (triton.cdiv(M, 16), triton.cdiv(N, kw["BLOCK_N"]), split)
            _sparse24q_swap_kernel[grid](
                x, values, m16, s, z, out, M, N, K, x.stride(0), x.stride(1), *vs,
                m16.stride(0), m16.stride(1), *qs, out.stride(0), out.stride(1), group_size,
                BLOCK_M=16, SPLIT_K=split,
                MAGIC16=0x6400 if x.dtype == torch.float16 else 0x4300,
                EVEN=K % (16 * kw["BLOCK_W"]) == 0 and N % kw["BLOCK_N"] == 0, **opts, **kw)
            return finish_out(out, x)
        if swap:
            if "BLOCK_G" not in kw or x.dtype not in (torch.float16, torch.bfloat16) \
                    or values.dtype != x.dtype or values.stride(1) != 1 \
                    or values.stride(0) % 2 or values.storage_offset() % 2 \
                    or meta.stride(1) != 1:
                raise ValueError("the swapped-operand 2:4 kernel takes fp16 or bf16 values "
                                 "[N, K/2] of x's dtype and meta [N, K/32], each row "
                                 "contiguous and the values' rows 4-byte aligned")
            out = atomic_out(M, N, x, split)
            v32 = values.view(torch.int32)  # a group's two kept values in one word
            m8 = meta.view(torch.uint8)  # a pair of groups' four positions in one byte
            grid = (triton.cdiv(M, 16), triton.cdiv(N, kw["BLOCK_N"]), split)
            _sparse24_swap_kernel[grid](
                x, v32, m8, out, M, N, K, x.stride(0), x.stride(1), v32.stride(0),
                v32.stride(1), m8.stride(0), m8.stride(1), out.stride(0), out.stride(1),
                BLOCK_M=16, SPLIT_K=split,
                EVEN=K % (4 * kw["BLOCK_G"]) == 0 and N % kw["BLOCK_N"] == 0, **opts, **kw)
            return finish_out(out, x)
        out = atomic_out(M, N, x, split)
        if kw.pop("GEMV", False):
            grid = (triton.cdiv(N, kw["BLOCK_N"]), split, M)
            if quant is None:
                _sparse24_gemv_kernel[grid](
                    x, values, meta, out, M, N, K, x.stride(0), x.stride(1), vs[1], vs[0],
                    ms[1], ms[0], out.stride(0), out.stride(1), SPLIT_K=split, **opts, **kw)
            else:
                _sparse24q_gemv_kernel[grid](
                    x, values, meta, s, z, out, M, N, K, x.stride(0), x.stride(1), vs[0],
                    vs[1], ms[0], ms[1], *qs, out.stride(0), out.stride(1), group_size,
                    BLOCK_N=kw["BLOCK_N"], BLOCK_W=kw["BLOCK_G"] // 4, SPLIT_K=split,
                    WORD_GROUPS=group_size % 16 == 0, **opts)
            return finish_out(out, x)
        grid = (triton.cdiv(M, kw["BLOCK_M"]), triton.cdiv(N, kw["BLOCK_N"]), split)
        _sparse24_matmul_kernel[grid](
            x, values, meta, s, z, out, M, N, K,
            x.stride(0), x.stride(1), vs[0], vs[1], ms[1], ms[0], *qs,
            out.stride(0), out.stride(1), group_size,
            SPLIT_K=split, QUANT=quant is not None, **opts, **kw,
        )
        return finish_out(out, x)

    if cfg is not None:
        return run(cfg)
    key = ("sparse24", M, K, N, x.dtype, None if quant is None else group_size)
    return pick(key, configs(M, quant is not None), run, x.is_cuda)
