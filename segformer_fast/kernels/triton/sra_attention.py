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

Launch configurations are chosen in ``kernel_config`` only, so the AOT test
compiles exactly what runs. Under TRITON_INTERPRET=1 the same configuration is used (no
autotuning); only bf16 math is upcast to fp32 there (``UPCAST``) because the interpreter gets
bf16 arithmetic and bf16 ``tl.dot`` wrong, while the GPU keeps bf16 tensor cores.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _sra_fwd_kernel(Q, K, V, O, LSE,
                    stride_qb, stride_qn, stride_kb, stride_km, stride_vb, stride_vm,
                    stride_ob, stride_on,
                    N, M, H, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)      # int64: b * batch stride overflows int32 at 1024x2048
    h = pid_bh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM          # head dims that are not a power of two are padded

    q_ptrs = Q + b * stride_qb + offs_n[:, None] * stride_qn + (h * HEAD_DIM + offs_d)[None, :]
    q = tl.load(q_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + (h * HEAD_DIM + offs_d)[:, None]     # K^T tile: (BLOCK_D, BLOCK_M)
    v_base = V + b * stride_vb + (h * HEAD_DIM + offs_d)[None, :]     # V tile: (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < M
        kt = tl.load(k_base + offs_m[None, :] * stride_km, mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        v = tl.load(v_base + offs_m[:, None] * stride_vm, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        # scores in log2 units; padded keys get -inf so they weigh exactly 0
        s = tl.where(mask_m[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))   # finite: every tile holds >= 1 real key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + offs_n[:, None] * stride_on + (h * HEAD_DIM + offs_d)[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_n, m_i + tl.log2(l_i), mask=mask_n)


@triton.jit
def _sra_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                       stride_qb, stride_qn, stride_kb, stride_km, stride_vb, stride_vm,
                       stride_dob, stride_don, stride_dqb, stride_dqn,
                       N, M, H, qk_scale, sm_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]
    col = (h * HEAD_DIM + offs_d)[None, :]

    q = tl.load(Q + b * stride_qb + offs_n[:, None] * stride_qn + col, mask=mask_nd, other=0.0)
    do = tl.load(DO + b * stride_dob + offs_n[:, None] * stride_don + col, mask=mask_nd, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row = pid_bh.to(tl.int64) * N + offs_n
    lse = tl.load(LSE + row, mask=mask_n, other=0.0)

    k_base = K + b * stride_kb + (h * HEAD_DIM + offs_d)[None, :]     # K tile (BLOCK_M, BLOCK_D)
    v_base = V + b * stride_vb + (h * HEAD_DIM + offs_d)[:, None]     # V^T tile (BLOCK_D, BLOCK_M)

    # Pass 1: delta_i = sum_j P_ij dP_ij from the same recomputed P and dP that pass 2 uses, not
    # the textbook dO_i . O_i: then sum_j dS_ij = delta_i (1 - sum_j P_ij) vanishes to rounding
    # exactly as in PyTorch's softmax backward, so the key-bias gradient (sum of dK over keys,
    # exactly 0 in theory) stays at rounding level, and at M = 1 dQ is exactly 0. Few keys make
    # the second sweep cheap (K/V of a head sit in L2) and O is never re-read.
    delta = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < M
        k = tl.load(k_base + offs_m[:, None] * stride_km, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        vt = tl.load(v_base + offs_m[None, :] * stride_vm, mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(do, vt, input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            dp = tl.dot(do, vt)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(mask_m[None, :], p, 0.0)
        delta += tl.sum(p * dp, 1)
    tl.store(DELTA + row, delta, mask=mask_n)

    # Pass 2: dQ = scale * sum_j dS_ij K_j
    dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < M
        k = tl.load(k_base + offs_m[:, None] * stride_km, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        vt = tl.load(v_base + offs_m[None, :] * stride_vm, mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(do, vt, input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            dp = tl.dot(do, vt)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(mask_m[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + offs_n[:, None] * stride_dqn + col, dq.to(DQ.dtype.element_ty), mask=mask_nd)


@triton.jit
def _sra_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                         stride_qb, stride_qn, stride_kb, stride_km, stride_vb, stride_vm,
                         stride_dob, stride_don, stride_dks, stride_dkb, stride_dkm,
                         N, M, H, qk_scale, sm_scale, tiles_per_split,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)            # which chunk of query tiles this program sums over
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]
    col = (h * HEAD_DIM + offs_d)[None, :]

    k = tl.load(K + b * stride_kb + offs_m[:, None] * stride_km + col, mask=mask_md, other=0.0)
    v = tl.load(V + b * stride_vb + offs_m[:, None] * stride_vm + col, mask=mask_md, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q_base = Q + b * stride_qb + col
    do_base = DO + b * stride_dob + col
    row0 = pid_bh.to(tl.int64) * N
    n_lo = pid_s * tiles_per_split * BLOCK_N
    n_hi = tl.minimum(n_lo + tiles_per_split * BLOCK_N, N)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_n[:, None] * stride_qn, mask=mask_nd, other=0.0)
        do = tl.load(do_base + offs_n[:, None] * stride_don, mask=mask_nd, other=0.0)
        lse = tl.load(LSE + row0 + offs_n, mask=mask_n, other=0.0)
        delta = tl.load(DELTA + row0 + offs_n, mask=mask_n, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # transposed problem: S^T = K Q^T (BLOCK_M, BLOCK_N), so dK = dS^T Q and dV = P^T dO
        # are plain dots without transposing the large operands
        if IEEE:
            st = tl.dot(k, tl.trans(q), input_precision="ieee")
            dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            st = tl.dot(k, tl.trans(q))
            dpt = tl.dot(v, tl.trans(do))
        pt = tl.exp2(st * qk_scale - lse[None, :])
        pt = tl.where(mask_n[None, :], pt, 0.0)       # padded query rows contribute nothing
        dst = pt * (dpt - delta[None, :])
        if IEEE:
            dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
            dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee")
        else:
            dv += tl.dot(pt.to(do.dtype), do)
            dk += tl.dot(dst.to(q.dtype), q)
    dk = dk * sm_scale
    out = pid_s.to(tl.int64) * stride_dks + b * stride_dkb + offs_m[:, None] * stride_dkm + col
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask_md)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_md)


# ----------------------------------------------------------------------------------------------
# Launch configuration: the single place that decides tiles, warps and stages.
# ----------------------------------------------------------------------------------------------

def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))    # tl.dot needs K >= 16


def kernel_config(kernel: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles, warps and stages of ``kernel`` ("fwd", "dq", "dkdv") for a head dim and dtype.

    BLOCK_N tiles queries, BLOCK_M keys. BLOCK_M <= 64 so M > 64 really iterates the online
    softmax; at M <= BLOCK_M one tile covers all keys (a single pass). fp16/bf16 dots run on
    tensor cores; fp32 IEEE dots run on CUDA cores with a larger register footprint, so fp32
    uses 32-key tiles and 8 warps. Every entry was compiled for sm_80 and sm_90 with 0 spills
    and <= 100 KB shared memory (tests/test_sra_attention.py::test_aot_*)."""
    bd = block_d(head_dim)
    fp32 = dtype == torch.float32
    if kernel == "fwd":
        if fp32:
            cfg = (64, 32, 8, 2)
        elif bd <= 32:
            cfg = (128, 64, 4, 3)
        elif bd <= 64:
            cfg = (128, 64, 8, 3)
        else:
            cfg = (64, 64, 4, 2)
    elif kernel == "dq":
        if fp32:
            # d = 128 in fp32 (not a SegFormer shape) only fits without spills at 16 x 16
            cfg = (64, 32, 8, 2) if bd <= 64 else (16, 16, 8, 1)
        else:
            cfg = (64, 64, 4, 2)
    elif kernel == "dkdv":
        if fp32:
            cfg = (64, 32, 8, 2) if bd <= 64 else (16, 32, 4, 1)
        else:
            cfg = (64, 64, 4, 2) if bd <= 64 else (64, 32, 4, 1)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return dict(zip(("BLOCK_N", "BLOCK_M", "num_warps", "num_stages"), cfg))


def dkdv_splits(N: int, M: int, BH: int, block_n: int, block_m: int, target_programs: int = 132) -> int:
    """Split the query loop of dK/dV so that there is ~1 long-running program per H100 SM (132), but
    never fewer than 2 query tiles per split (the partial sums cost SPLITS*M*C fp32 writes)."""
    n_tiles = triton.cdiv(N, block_n)
    programs = triton.cdiv(M, block_m) * BH
    want = triton.cdiv(target_programs, programs)
    return max(1, min(want, n_tiles // 2))


def _flags(dtype: torch.dtype) -> dict:
    ieee = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    upcast = dtype == torch.bfloat16 and _interpreting()
    return dict(UPCAST=upcast, IEEE=ieee)


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
    cfg = kernel_config("fwd", d, q.dtype)
    o = torch.empty((B, N, C), device=q.device, dtype=q.dtype)
    lse = torch.empty((B * num_heads, N), device=q.device, dtype=torch.float32)
    qk_scale, _ = _scales(scale)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), B * num_heads)
    _sra_fwd_kernel[grid](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1),
        N, M, num_heads, qk_scale,
        HEAD_DIM=d, BLOCK_D=block_d(d), **cfg, **_flags(q.dtype))
    return o, lse


def sra_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      lse: torch.Tensor, num_heads: int, scale: float):
    """dQ (B, N, C), dK and dV (B, M, C), all contiguous in the input dtype."""
    B, N, C = q.shape
    M = k.shape[1]
    d = C // num_heads
    BH = B * num_heads
    flags = _flags(q.dtype)
    qk_scale, sm_scale = _scales(scale)

    cfg = kernel_config("dq", d, q.dtype)
    dq = torch.empty((B, N, C), device=q.device, dtype=q.dtype)
    delta = torch.empty((BH, N), device=q.device, dtype=torch.float32)
    _sra_bwd_dq_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), BH)](
        q, k, v, do, dq, lse, delta,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        N, M, num_heads, qk_scale, sm_scale,
        HEAD_DIM=d, BLOCK_D=block_d(d), **cfg, **flags)

    cfg = kernel_config("dkdv", d, q.dtype)
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
        HEAD_DIM=d, BLOCK_D=block_d(d), **cfg, **flags)
    dk = (dk.sum(0) if splits > 1 else dk[0]).to(q.dtype)
    dv = (dv.sum(0) if splits > 1 else dv[0]).to(q.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time report: every kernel exactly as the launchers configure it, for GPUs this
# machine may not have. Run as ``TRITON_INTERPRET=0 python -m segformer_fast.kernels.triton.sra_attention``
# (the interpreter's @triton.jit objects cannot be lowered, hence a separate process).
# ----------------------------------------------------------------------------------------------

_AOT_SIG = {
    "fwd": ("_sra_fwd_kernel", ["Q", "K", "V", "O", "LSE"],
            ["stride_qb", "stride_qn", "stride_kb", "stride_km", "stride_vb", "stride_vm",
             "stride_ob", "stride_on", "N", "M", "H"], ["qk_scale"]),
    "dq": ("_sra_bwd_dq_kernel", ["Q", "K", "V", "DO", "DQ", "LSE", "DELTA"],
           ["stride_qb", "stride_qn", "stride_kb", "stride_km", "stride_vb", "stride_vm",
            "stride_dob", "stride_don", "stride_dqb", "stride_dqn", "N", "M", "H"],
           ["qk_scale", "sm_scale"]),
    "dkdv": ("_sra_bwd_dkdv_kernel", ["Q", "K", "V", "DO", "DK", "DV", "LSE", "DELTA"],
             ["stride_qb", "stride_qn", "stride_kb", "stride_km", "stride_vb", "stride_vm",
              "stride_dob", "stride_don", "stride_dks", "stride_dkb", "stride_dkm", "N", "M", "H",
              "tiles_per_split"], ["qk_scale", "sm_scale"]),
}
_TRITON_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_report(kernel: str, head_dim: int, dtype: torch.dtype, arch: int):
    """Compile ``kernel`` with its launch configuration for ``sm_{arch}``.

    Divisibility hints are what Triton's specialisation sees at real SegFormer shapes: torch
    pointers are 16-byte aligned; every stride (C, 2C for kv halves, N*C, M*C, B*M*C) and M
    ((H/32)*(W/32) = 256, 1024, 2048) are multiples of 16. N is left unhinted so the same binary
    serves any token count. The dK/dV outputs are compiled as fp32 partial-sum buffers (the
    split case, which is what runs at real shapes)."""
    from ...analysis.aot import compile_report
    name, ptrs, ints, floats = _AOT_SIG[kernel]
    el = _TRITON_TY[dtype]
    sig = {p: ("*fp32" if p in ("LSE", "DELTA", "DK", "DV") else f"*{el}") for p in ptrs}
    sig.update({i: "i32" for i in ints})
    sig.update({f: "fp32" for f in floats})
    cfg = kernel_config(kernel, head_dim, dtype)
    ce = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_N=cfg["BLOCK_N"],
              BLOCK_M=cfg["BLOCK_M"], UPCAST=False, IEEE=dtype == torch.float32)
    sig.update({c: "constexpr" for c in ce})
    div = tuple(ptrs) + tuple(i for i in ints if i.startswith("stride")) + ("M",)
    return compile_report(globals()[name], sig, ce, arch, divisible_by_16=div,
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


if __name__ == "__main__":
    import json
    import sys

    # argv: kernels dims dtypes, comma-separated (default: the SegFormer set)
    kernels = (sys.argv[1] if len(sys.argv) > 1 else "fwd,dq,dkdv").split(",")
    dims = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "32,64").split(",")]
    dtypes = [getattr(torch, x) for x in (sys.argv[3] if len(sys.argv) > 3 else "float16,float32").split(",")]
    for kernel in kernels:
        for d in dims:
            for dtype in dtypes:
                for arch in (80, 90):
                    r = aot_report(kernel, d, dtype, arch)
                    print(json.dumps(dict(kernel=kernel, head_dim=d, dtype=_TRITON_TY[dtype], arch=arch,
                                          config=kernel_config(kernel, d, dtype), registers=r.registers,
                                          spills=r.spills, shared=r.shared_bytes)), flush=True)
