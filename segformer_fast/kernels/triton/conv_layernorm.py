"""Strided conv + LayerNorm over output channels, tokens out: one implicit-GEMM Triton kernel.

Forward: one program owns BLOCK_M output tokens of one image and *all* Cout output channels
(Cout <= 512 in SegFormer, padded to BLOCK_N = next power of two), so the LayerNorm over channels
is a row reduction in the epilogue of the GEMM and the conv output never reaches HBM:

    x (any 4D strides: NCHW image or the channels-last view of (B, N, Cin) tokens)
      -> implicit GEMM  [BLOCK_M tokens, K = kh*kw*Cin] @ [K, BLOCK_N]   (tl.dot, fp32 acc)
      -> + bias -> mean/rstd over the Cout valid channels (fp32) -> * gamma + beta
      -> out (B, H'*W', Cout) contiguous tokens.

The reduction index k is ordered (kh, kw, cin), cin fastest: for token input the channel dim is
the contiguous one, so a BLOCK_K slice of k reads BLOCK_K consecutive channels of one pixel
(coalesced); for the 3-channel image k decomposes across taps inside one block, so small Cin
wastes no lanes (only the last block is masked). The weight is fed as a (K, Cout) matrix in the
same k order, Cout contiguous (a one-off permute of a tensor far smaller than the activations).

Backward (dz kernel): recomputes the conv tile exactly like the forward (the same helper), so
neither the conv output nor mean/rstd are ever stored: the statistics are a free row reduction
of the recomputed tile, and re-reading x costs |x| bytes where saving z would cost a write and a
read of |z| (for the patch embeddings |x| <= |z|; FLOPs are tensor-core and far from bound). It
then applies the LayerNorm backward in the epilogue, writes d(conv output) as tokens and per-
program partial sums of dgamma, dbeta and dbias (reduced by one small torch sum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LaunchConfig, interpreting, load_vec, pow2_block, precision, store_buffer, stored


@triton.jit
def _implicit_gemm_tile(x_ptr, w_ptr, b, offs_m, mask_m, offs_n, mask_n,
                        Cin, H, W, Wo, Cout, K, KW, stride_h, stride_w, pad_h, pad_w,
                        sxb, sxc, sxh, sxw,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 tile of the conv output (no bias) for tokens offs_m of image b."""
    ho = offs_m // Wo
    wo = offs_m % Wo
    hi0 = ho * stride_h - pad_h                       # top-left input pixel of each token's window
    wi0 = wo * stride_w - pad_w
    x_img = x_ptr + b.to(tl.int64) * sxb              # batch offset in 64 bits: large images
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < K
        c = k % Cin                                   # k = (kh * KW + kw) * Cin + c
        tap = k // Cin
        kh = tap // KW
        kw = tap % KW
        hi = hi0[:, None] + kh[None, :]
        wi = wi0[:, None] + kw[None, :]
        # zero padding = masked load; also masks tokens past H'*W' and k past K
        a_mask = (mask_m[:, None] & mask_k[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W))
        a = tl.load(x_img + hi * sxh + wi * sxw + c[None, :] * sxc, mask=a_mask, other=0.0)
        wt = tl.load(w_ptr + k[:, None] * Cout + offs_n[None, :],
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _conv_ln_tile(x_ptr, w_ptr, bias_ptr,
                  Cin, H, W, Ho, Wo, Cout, K, KW, stride_h, stride_w, pad_h, pad_w,
                  sxb, sxc, sxh, sxw, eps,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """This program's tile, shared by the forward and the (recomputing) backward kernel: the
    normalised conv output xhat (BLOCK_M, BLOCK_N) fp32, exactly 0 in padded channels, its rstd
    (BLOCK_M,), the flat offsets of the tile in the (B, Ho*Wo, Cout) token output, the token
    mask (BLOCK_M,) and the channel mask (BLOCK_N,)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    Nout = Ho * Wo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < Nout
    mask_n = offs_n < Cout
    z = _implicit_gemm_tile(x_ptr, w_ptr, b, offs_m, mask_m, offs_n, mask_n,
                            Cin, H, W, Wo, Cout, K, KW, stride_h, stride_w, pad_h, pad_w,
                            sxb, sxc, sxh, sxw, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION)
    if HAS_BIAS:
        z += load_vec(bias_ptr, offs_n, mask_n)
    # LayerNorm over the Cout valid channels: padded columns are exactly 0 in z (masked weight
    # and bias loads), so the sum is right; the centred values are masked before the variance.
    mean = tl.sum(z, axis=1) / Cout
    diff = tl.where(mask_n[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / Cout + eps)
    rows = b.to(tl.int64) * Nout + offs_m
    return diff * rstd[:, None], rstd, rows[:, None] * Cout + offs_n[None, :], mask_m, mask_n


# Kernel arguments: x (B, Cin, H, W) with strides (sxb, sxc, sxh, sxw) (an NCHW image, or the
# channels-last view of (B, H*W, Cin) tokens); w (K, Cout) with k = (kh, kw, cin), Cout
# contiguous (``weight_km``); bias, gamma, beta (Cout,); out, dy, dz (B, Ho*Wo, Cout) tokens;
# part (programs, 3, Cout) fp32; K = KH*KW*Cin. Absent parameters get a dummy pointer and a
# False HAS_* constexpr.

@triton.jit
def _conv_ln_fwd_kernel(x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, out_ptr,
                        Cin, H, W, Ho, Wo, Cout, K, KW, stride_h, stride_w, pad_h, pad_w,
                        sxb, sxc, sxh, sxw, eps,
                        HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    y, _, offs, mask_m, mask_n = _conv_ln_tile(
        x_ptr, w_ptr, bias_ptr, Cin, H, W, Ho, Wo, Cout, K, KW, stride_h, stride_w, pad_h, pad_w,
        sxb, sxc, sxh, sxw, eps, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION)
    offs_n = tl.arange(0, BLOCK_N)
    if HAS_GAMMA:
        y = y * load_vec(gamma_ptr, offs_n, mask_n)
    if HAS_BETA:
        y = y + load_vec(beta_ptr, offs_n, mask_n)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _conv_ln_bwd_kernel(x_ptr, w_ptr, bias_ptr, gamma_ptr, dy_ptr, dz_ptr, part_ptr,
                        Cin, H, W, Ho, Wo, Cout, K, KW, stride_h, stride_w, pad_h, pad_w,
                        sxb, sxc, sxh, sxw, eps,
                        HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # recompute the conv output and its statistics (see module docstring for why)
    xhat, rstd, offs, mask_m, mask_n = _conv_ln_tile(
        x_ptr, w_ptr, bias_ptr, Cin, H, W, Ho, Wo, Cout, K, KW, stride_h, stride_w, pad_h, pad_w,
        sxb, sxc, sxh, sxw, eps, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        wdy = dy * load_vec(gamma_ptr, tl.arange(0, BLOCK_N), mask_n)
    else:
        wdy = dy
    # dz = rstd * (wdy - mean(xhat * wdy) * xhat - mean(wdy)); masked rows/cols give exactly 0
    c1 = tl.sum(xhat * wdy, axis=1) / Cout
    c2 = tl.sum(wdy, axis=1) / Cout
    dz = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    dz = tl.where(mask, dz, 0.0)
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    # per-program partial column sums (fp32) of dgamma, dbeta, dbias: rows of `part` (P, 3, Cout)
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    part = part_ptr + pid.to(tl.int64) * 3 * Cout + tl.arange(0, BLOCK_N)
    tl.store(part, tl.sum(tl.where(mask, dy * xhat, 0.0), axis=0), mask=mask_n)
    tl.store(part + Cout, tl.sum(dy, axis=0), mask=mask_n)
    tl.store(part + 2 * Cout, tl.sum(dz, axis=0), mask=mask_n)


# ----------------------------------------------------------------------------------------------
# Launch configuration: the one place that decides tiles, warps and stages.

def launch_config(kernel: str, cout: int, k: int, dtype: torch.dtype) -> LaunchConfig:
    """Tiles of ``kernel`` ("fwd" or "bwd": they share one) for Cout output channels and a
    reduction of K = Cin*kh*kw, in ``dtype``.

    GPU: the fp32 accumulator is BLOCK_M x BLOCK_N and lives in registers together with the
    [BLOCK_M, BLOCK_K] implicit-GEMM address/mask tiles (64-bit pointers) and, in the backward,
    the dy / xhat / dz tiles of the LayerNorm backward. Measured with ptxas (``python -m
    segformer_fast kernels``): about 16 accumulator elements per thread with 16-bit operands,
    8 with fp32 operands (CUDA-core IEEE dots: their A/B fragments take twice the registers),
    keeps both kernels spill-free at every Cout of SegFormer with Triton 3.6 and 3.9. fp32 thus
    runs the same tiles as 16-bit over 8 warps: over 4 warps, the 32 x 64 fp32 tile of the B1+
    stem spilled 8 B on sm_90 with Triton 3.9. BLOCK_M never drops below 16 (the tensor-core
    minimum). BLOCK_K and stages keep the pipelined A+B tiles under 64 KB of shared memory
    (Triton buffers num_stages - 1 of them).
    """
    if kernel not in ("fwd", "bwd"):
        raise ValueError(f"unknown kernel {kernel!r}")
    block_n = pow2_block(cout)
    if interpreting():
        # one config; few, fat programs keep the interpreter (about 0.6 ms per program) fast
        return LaunchConfig(BLOCK_M=32, BLOCK_N=block_n, BLOCK_K=64, num_warps=4, num_stages=1)
    fp32 = dtype == torch.float32
    num_warps = 8 if (block_n >= 256 or fp32) else 4
    block_m = max(16, min(64, ((8 if fp32 else 16) * 32 * num_warps) // block_n))
    block_k = 16 if (block_n >= 256 or k <= 16) else 32
    stage_bytes = (block_m + block_n) * block_k * dtype.itemsize
    num_stages = max(2, min(3, 1 + (64 * 1024) // stage_bytes))
    return LaunchConfig(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                        num_stages=num_stages)


def weight_km(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, kh, kw) -> (K, Cout) with k = (kh, kw, cin), Cout contiguous."""
    cout = weight.shape[0]
    return weight.permute(2, 3, 1, 0).reshape(-1, cout).contiguous()


def out_size(h: int, w: int, kh: int, kw: int, stride, padding) -> tuple[int, int]:
    return ((h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1)


def _geometry(x, weight, stride, padding):
    """(Ho, Wo) and the integer kernel arguments from Cin to sxw, in the kernels' order."""
    B, Cin, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    Ho, Wo = out_size(H, W, KH, KW, stride, padding)
    return (Ho, Wo), (Cin, H, W, Ho, Wo, Cout, Cin * KH * KW, KW, stride[0], stride[1],
                      padding[0], padding[1], *x.stride())


# ----------------------------------------------------------------------------------------------
# Launchers (no checks: segformer_fast.ops.conv_layernorm validates before calling these)

def conv_layernorm_fwd(x, weight, bias, gamma, beta, stride, padding, eps):
    """x: 4D with any strides (NCHW image or channels-last view of tokens). Returns tokens."""
    B, Cout = x.shape[0], weight.shape[0]
    (Ho, Wo), geo = _geometry(x, weight, stride, padding)
    out = store_buffer((B, Ho * Wo, Cout), x.dtype, x.device)
    if out.numel() == 0:
        return stored(out, x.dtype)
    cfg = launch_config("fwd", Cout, geo[6], x.dtype)
    wk = weight_km(weight)
    grid = (triton.cdiv(Ho * Wo, cfg["BLOCK_M"]), B)
    _conv_ln_fwd_kernel[grid](
        x, wk, bias if bias is not None else wk, gamma if gamma is not None else wk,
        beta if beta is not None else wk, out, *geo, float(eps),
        HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
        **precision(x.dtype), **cfg.kwargs())
    return stored(out, x.dtype)


def conv_layernorm_bwd_dz(dy, x, weight, bias, gamma, stride, padding, eps):
    """d(conv output) as tokens (B, H'W', Cout) in x's dtype, and fp32 (dgamma, dbeta, dbias)."""
    B, Cout = x.shape[0], weight.shape[0]
    (Ho, Wo), geo = _geometry(x, weight, stride, padding)
    dy = dy.contiguous()
    dz = store_buffer((B, Ho * Wo, Cout), x.dtype, x.device)
    cfg = launch_config("bwd", Cout, geo[6], x.dtype)
    wk = weight_km(weight)
    grid = (triton.cdiv(Ho * Wo, cfg["BLOCK_M"]), B)
    part = torch.empty((grid[0] * grid[1], 3, Cout), device=x.device, dtype=torch.float32)
    if dz.numel() == 0:
        part.zero_()
        dz.zero_()
    else:
        _conv_ln_bwd_kernel[grid](
            x, wk, bias if bias is not None else wk, gamma if gamma is not None else wk, dy, dz, part,
            *geo, float(eps), HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None,
            **precision(x.dtype), **cfg.kwargs())
    dgamma, dbeta, dbias = part.sum(0).unbind(0)
    return stored(dz, x.dtype), dgamma, dbeta, dbias
