"""Flash-style spatial-reduction attention: many queries, few keys.

Layout: q (B, N, C), k and v (B, M, C), head h = channels h*d ... (h+1)*d. Every tensor is read
through (batch stride, row stride) with the channel dim contiguous, so k and v may be the two
column halves of one (B, M, 2C) ``kv`` projection (row stride 2C) and nothing is transposed or
copied: a program gathers its head's d-wide column slab directly (d*elt bytes per row, coalesced).

Kernels (one program per (query tile | key tile, batch*head)):
- ``_sra_fwd_kernel``: online softmax over key tiles in fp32 (base-2 exponentials, scale*log2(e)
  folded into the scores), writes O (B, N, C) and the row log-sum-exp (B*H, N) in fp32. At
  SegFormer shapes M = (H/32)(W/32) is a few hundred, so K/V of one head are re-read from L2 by
  every query tile and the N x M score matrix never leaves registers.
- ``_sra_bwd_dq_kernel``: delta = rowsum(P * dP) (FA2's preprocessing step, here a first sweep
  over the few keys, see the kernel), then dQ by recomputing P from the saved LSE.
- ``_sra_bwd_dkdv_kernel``: dK, dV per key tile. There are few keys, so one program per key tile
  would leave the GPU idle (4 programs per head at 512^2); the query loop is split into
  ``SPLITS`` chunks that write fp32 partial sums reduced afterwards (deterministic, no atomics;
  the partial buffer is SPLITS*M*C floats, tiny because M is small).

Launch configurations are chosen in ``launch_config`` only (``python -m segformer_fast kernels``
compiles what the launchers launch). Under TRITON_INTERPRET=1 the same configuration is used (no
autotuning); precision constexprs come from ``common.precision`` (bf16 upcast under the
interpreter only, IEEE fp32 dots).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LaunchConfig, pow2_block, precision, store_buffer, stored

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Tile prologues shared by the forward and backward kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _head_columns(pid_bh, H, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program axis batch*head -> (batch index, this head's channel columns (BLOCK_D,), their mask).

    The batch index is int64: b * batch stride overflows int32 at 1024x2048. Head dims that are
    not a power of two are padded to BLOCK_D and masked."""
    offs_d = tl.arange(0, BLOCK_D)
    return (pid_bh // H).to(tl.int64), (pid_bh % H) * HEAD_DIM + offs_d, offs_d < HEAD_DIM


@triton.jit
def _query_rows(N, H, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Prologue of the kernels gridded (query tile, batch*head): batch index, head columns and
    their mask (``_head_columns``), this program's query rows (BLOCK_N,) and their mask."""
    b, cols, mask_d = _head_columns(tl.program_id(1), H, HEAD_DIM, BLOCK_D)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return b, cols, mask_d, offs_n, offs_n < N


@triton.jit
def _load_rows(base, rows, stride_row, mask_row, cols, mask_col,
               TRANSPOSE: tl.constexpr, UPCAST: tl.constexpr):
    """One head's slab of a token matrix: (len(rows), BLOCK_D) at base + row*stride_row + col, or
    (BLOCK_D, len(rows)) when TRANSPOSE (loaded transposed: nothing is transposed in registers)."""
    if TRANSPOSE:
        t = tl.load(base + rows[None, :] * stride_row + cols[:, None],
                    mask=mask_col[:, None] & mask_row[None, :], other=0.0)
    else:
        t = tl.load(base + rows[:, None] * stride_row + cols[None, :],
                    mask=mask_row[:, None] & mask_col[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _probs_and_dp(q, do, lse, K, V, offs_m, M, stride_km, stride_vm, cols, mask_d, qk_scale,
                  UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One key tile of the dQ kernel: the K tile (BLOCK_M, BLOCK_D), P recomputed from the saved
    LSE (BLOCK_N, BLOCK_M; exactly 0 at padded keys) and dP = dO V^T (BLOCK_N, BLOCK_M).
    q, do (BLOCK_N, BLOCK_D); lse (BLOCK_N,); K, V point at this batch's rows."""
    mask_m = offs_m < M
    # S = q K^T exactly as the forward computes it (K^T loaded transposed, the same dot), so P
    # over a single key is exactly 1 and dQ exactly 0 there, as in PyTorch
    kt = _load_rows(K, offs_m, stride_km, mask_m, cols, mask_d, True, UPCAST)
    vt = _load_rows(V, offs_m, stride_vm, mask_m, cols, mask_d, True, UPCAST)
    s = tl.dot(q, kt, input_precision=INPUT_PRECISION)
    dp = tl.dot(do, vt, input_precision=INPUT_PRECISION)
    p = tl.exp2(s * qk_scale - lse[:, None])
    return tl.trans(kt), tl.where(mask_m[None, :], p, 0.0), dp


# ----------------------------------------------------------------------------------------------
# Kernels. Shapes: C = H * HEAD_DIM; q rows strided by stride_qn, k/v rows by stride_km/stride_vm
# (2C when they are the halves of one kv projection); every channel dim is contiguous.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sra_fwd_kernel(Q, K, V, O, LSE,       # q (B, N, C); k, v (B, M, C); O (B, N, C); LSE (B*H, N) fp32
                    stride_qb, stride_qn, stride_kb, stride_km, stride_vb, stride_vm,
                    stride_ob, stride_on,
                    N, M, H, qk_scale,      # qk_scale = scale * log2(e)
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    b, cols, mask_d, offs_n, mask_n = _query_rows(N, H, HEAD_DIM, BLOCK_D, BLOCK_N)
    q = _load_rows(Q + b * stride_qb, offs_n, stride_qn, mask_n, cols, mask_d, False, UPCAST)
    k_base = K + b * stride_kb
    v_base = V + b * stride_vb

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        kt = _load_rows(k_base, offs_m, stride_km, mask_m, cols, mask_d, True, UPCAST)   # K^T tile
        v = _load_rows(v_base, offs_m, stride_vm, mask_m, cols, mask_d, False, UPCAST)
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION)
        # scores in log2 units; padded keys get -inf so they weigh exactly 0
        s = tl.where(mask_m[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))   # finite: every tile holds >= 1 real key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + offs_n[:, None] * stride_on + cols[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    tl.store(LSE + tl.program_id(1).to(tl.int64) * N + offs_n, m_i + tl.log2(l_i), mask=mask_n)


@triton.jit
def _sra_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,   # q, dO, dQ (B, N, C); k, v (B, M, C); LSE, DELTA (B*H, N) fp32
                       stride_qb, stride_qn, stride_kb, stride_km, stride_vb, stride_vm,
                       stride_dob, stride_don, stride_dqb, stride_dqn,
                       N, M, H, qk_scale, sm_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    b, cols, mask_d, offs_n, mask_n = _query_rows(N, H, HEAD_DIM, BLOCK_D, BLOCK_N)
    q = _load_rows(Q + b * stride_qb, offs_n, stride_qn, mask_n, cols, mask_d, False, UPCAST)
    do = _load_rows(DO + b * stride_dob, offs_n, stride_don, mask_n, cols, mask_d, False, UPCAST)
    row = tl.program_id(1).to(tl.int64) * N + offs_n
    lse = tl.load(LSE + row, mask=mask_n, other=0.0)
    k_base = K + b * stride_kb
    v_base = V + b * stride_vb

    # Pass 1: delta_i = sum_j P_ij dP_ij from the same recomputed P and dP that pass 2 uses, not
    # the textbook dO_i . O_i: then sum_j dS_ij = delta_i (1 - sum_j P_ij) vanishes to rounding
    # exactly as in PyTorch's softmax backward, so the key-bias gradient (sum of dK over keys,
    # exactly 0 in theory) stays at rounding level, and at M = 1 dQ is exactly 0. Few keys make
    # the second sweep cheap (K/V of a head sit in L2) and O is never re-read.
    delta = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        _, p, dp = _probs_and_dp(q, do, lse, k_base, v_base, start_m + tl.arange(0, BLOCK_M), M,
                                 stride_km, stride_vm, cols, mask_d, qk_scale, UPCAST, INPUT_PRECISION)
        delta += tl.sum(p * dp, 1)
    tl.store(DELTA + row, delta, mask=mask_n)

    # Pass 2: dQ = scale * sum_j dS_ij K_j
    dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        k, p, dp = _probs_and_dp(q, do, lse, k_base, v_base, start_m + tl.arange(0, BLOCK_M), M,
                                 stride_km, stride_vm, cols, mask_d, qk_scale, UPCAST, INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + offs_n[:, None] * stride_dqn + cols[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def _sra_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,   # q, dO (B, N, C); k, v (B, M, C);
                         # DK, DV (SPLITS, B, M, C) fp32 partial sums; LSE, DELTA (B*H, N) fp32
                         stride_qb, stride_qn, stride_kb, stride_km, stride_vb, stride_vm,
                         stride_dob, stride_don, stride_dks, stride_dkb, stride_dkm,
                         N, M, H, qk_scale, sm_scale, tiles_per_split,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)            # which chunk of query tiles this program sums over
    b, cols, mask_d = _head_columns(pid_bh, H, HEAD_DIM, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    k = _load_rows(K + b * stride_kb, offs_m, stride_km, mask_m, cols, mask_d, False, UPCAST)
    v = _load_rows(V + b * stride_vb, offs_m, stride_vm, mask_m, cols, mask_d, False, UPCAST)

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q_base = Q + b * stride_qb
    do_base = DO + b * stride_dob
    row0 = pid_bh.to(tl.int64) * N
    n_lo = pid_s * tiles_per_split * BLOCK_N
    n_hi = tl.minimum(n_lo + tiles_per_split * BLOCK_N, N)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        q = _load_rows(q_base, offs_n, stride_qn, mask_n, cols, mask_d, False, UPCAST)
        do = _load_rows(do_base, offs_n, stride_don, mask_n, cols, mask_d, False, UPCAST)
        lse = tl.load(LSE + row0 + offs_n, mask=mask_n, other=0.0)
        delta = tl.load(DELTA + row0 + offs_n, mask=mask_n, other=0.0)
        # transposed problem: S^T = K Q^T (BLOCK_M, BLOCK_N), so dK = dS^T Q and dV = P^T dO
        # are plain dots without transposing the large operands
        st = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        pt = tl.exp2(st * qk_scale - lse[None, :])
        pt = tl.where(mask_n[None, :], pt, 0.0)       # padded query rows contribute nothing
        dst = pt * (dpt - delta[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=INPUT_PRECISION)
        dk += tl.dot(dst.to(q.dtype), q, input_precision=INPUT_PRECISION)
    dk = dk * sm_scale
    out = pid_s.to(tl.int64) * stride_dks + b * stride_dkb + offs_m[:, None] * stride_dkm + cols[None, :]
    mask_md = mask_m[:, None] & mask_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask_md)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_md)


# ----------------------------------------------------------------------------------------------
# Launch configuration: the single place that decides tiles, warps and stages.
# ----------------------------------------------------------------------------------------------

def block_d(head_dim: int) -> int:
    return pow2_block(head_dim)     # tl.dot needs K >= 16


def launch_config(kernel: str, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """Tiles, warps and stages of ``kernel`` ("fwd", "dq", "dkdv") for a head dim and dtype.

    BLOCK_N tiles queries, BLOCK_M keys. BLOCK_M <= 64 so M > 64 really iterates the online
    softmax; at M <= BLOCK_M one tile covers all keys (a single pass). fp16/bf16 dots run on
    tensor cores. fp32 IEEE dots run on CUDA cores with a larger register footprint: at
    d <= 64 all three kernels use 32 x 32 tiles over 4 warps. 64 x 32 tiles over 8 warps
    compiled spill-free with Triton 3.9, but Triton 3.6 capped them at 80 registers and spilled
    12 B (forward, sm_80), 8 B (dK/dV, sm_80) and 16 B (dQ, sm_90) at d = 64; 64 x 32 over
    4 warps spilled hundreds of bytes with both. Every entry compiles for sm_80 and sm_90 with
    0 spills and <= 100 KB shared memory with Triton 3.6 and 3.9 (``python -m segformer_fast
    kernels``)."""
    bd = block_d(head_dim)
    if kernel not in ("fwd", "dq", "dkdv"):
        raise ValueError(f"unknown kernel {kernel!r}")
    if dtype == torch.float32:
        if bd <= 64:
            cfg = (32, 32, 4, 2)
        else:   # d = 128 (not a SegFormer shape) only fits without spills at these tiles
            cfg = {"fwd": (64, 32, 8, 2), "dq": (16, 16, 8, 1), "dkdv": (16, 32, 4, 1)}[kernel]
    elif kernel == "fwd":
        cfg = (128, 64, 4, 3) if bd <= 32 else (128, 64, 8, 3) if bd <= 64 else (64, 64, 4, 2)
    elif kernel == "dq":
        cfg = (64, 64, 4, 2)
    else:
        cfg = (64, 64, 4, 2) if bd <= 64 else (64, 32, 4, 1)
    bn, bm, warps, stages = cfg
    return LaunchConfig(BLOCK_N=bn, BLOCK_M=bm, num_warps=warps, num_stages=stages)


def dkdv_splits(N: int, M: int, BH: int, block_n: int, block_m: int, target_programs: int = 132) -> int:
    """Split the query loop of dK/dV so that there is ~1 long-running program per H100 SM (132), but
    never fewer than 2 query tiles per split (the partial sums cost SPLITS*M*C fp32 writes)."""
    n_tiles = triton.cdiv(N, block_n)
    programs = triton.cdiv(M, block_m) * BH
    want = triton.cdiv(target_programs, programs)
    return max(1, min(want, n_tiles // 2))


def _scales(scale: float) -> tuple[float, float]:
    return float(scale) * LOG2E, float(scale)


# ----------------------------------------------------------------------------------------------
# Launchers (no checks: segformer_fast.ops.sra_attention validates before calling these)
# ----------------------------------------------------------------------------------------------

def sra_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """O (B, N, C) contiguous and LSE (B*H, N) fp32 in log2 units."""
    B, N, C = q.shape
    M = k.shape[1]
    d = C // num_heads
    cfg = launch_config("fwd", d, q.dtype)
    o = store_buffer((B, N, C), q.dtype, q.device)
    lse = torch.empty((B * num_heads, N), device=q.device, dtype=torch.float32)
    qk_scale, _ = _scales(scale)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), B * num_heads)
    _sra_fwd_kernel[grid](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1),
        N, M, num_heads, qk_scale,
        HEAD_DIM=d, BLOCK_D=block_d(d), **precision(q.dtype), **cfg.kwargs())
    return stored(o, q.dtype), lse


def sra_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      lse: torch.Tensor, num_heads: int, scale: float):
    """dQ (B, N, C), dK and dV (B, M, C), all contiguous in the input dtype."""
    B, N, C = q.shape
    M = k.shape[1]
    d = C // num_heads
    BH = B * num_heads
    prec = precision(q.dtype)
    qk_scale, sm_scale = _scales(scale)

    cfg = launch_config("dq", d, q.dtype)
    dq = store_buffer((B, N, C), q.dtype, q.device)
    delta = torch.empty((BH, N), device=q.device, dtype=torch.float32)
    _sra_bwd_dq_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), BH)](
        q, k, v, do, dq, lse, delta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        N, M, num_heads, qk_scale, sm_scale,
        HEAD_DIM=d, BLOCK_D=block_d(d), **prec, **cfg.kwargs())

    cfg = launch_config("dkdv", d, q.dtype)
    bn, bm = cfg["BLOCK_N"], cfg["BLOCK_M"]
    splits = dkdv_splits(N, M, BH, bn, bm)
    tiles_per_split = triton.cdiv(triton.cdiv(N, bn), splits)
    splits = triton.cdiv(triton.cdiv(N, bn), tiles_per_split)   # drop empty trailing splits
    # fp32 partial sums (one slab per query chunk) whatever the input dtype: one compiled
    # variant for every split count, and the split reduction happens in fp32
    dk = torch.empty((splits, B, M, C), device=q.device, dtype=torch.float32)
    dv = torch.empty((splits, B, M, C), device=q.device, dtype=torch.float32)
    _sra_bwd_dkdv_kernel[(triton.cdiv(M, bm), BH, splits)](
        q, k, v, do, dk, dv, lse, delta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), B * M * C, dk.stride(-3), dk.stride(-2),
        N, M, num_heads, qk_scale, sm_scale, tiles_per_split,
        HEAD_DIM=d, BLOCK_D=block_d(d), **prec, **cfg.kwargs())
    dk = (dk.sum(0) if splits > 1 else dk[0]).to(q.dtype)
    dv = (dv.sum(0) if splits > 1 else dv[0]).to(q.dtype)
    return stored(dq, q.dtype), dk, dv
