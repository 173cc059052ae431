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

import os

import torch
import triton
import triton.language as tl

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


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
            # the interpreter gets bf16 dot products wrong: do them in fp32 there only
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _conv_ln_fwd_kernel(x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, out_ptr,
                        Cin, H, W, Ho, Wo, Cout, K, KW, stride_h, stride_w, pad_h, pad_w,
                        sxb, sxc, sxh, sxw, eps,
                        HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
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
        z += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # LayerNorm over the Cout valid channels: padded columns are exactly 0 in z (masked weight
    # and bias loads), so the sum is right; the centred values are masked before the variance.
    mean = tl.sum(z, axis=1) / Cout
    diff = tl.where(mask_n[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / Cout + eps)
    y = diff * rstd[:, None]
    if HAS_GAMMA:
        y = y * tl.load(gamma_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BETA:
        y = y + tl.load(beta_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    rows = b.to(tl.int64) * Nout + offs_m
    tl.store(out_ptr + rows[:, None] * Cout + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _conv_ln_bwd_kernel(x_ptr, w_ptr, bias_ptr, gamma_ptr, dy_ptr, dz_ptr, part_ptr,
                        Cin, H, W, Ho, Wo, Cout, K, KW, stride_h, stride_w, pad_h, pad_w,
                        sxb, sxc, sxh, sxw, eps,
                        HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    Nout = Ho * Wo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < Nout
    mask_n = offs_n < Cout
    mask = mask_m[:, None] & mask_n[None, :]
    # recompute the conv output and its statistics (see module docstring for why)
    z = _implicit_gemm_tile(x_ptr, w_ptr, b, offs_m, mask_m, offs_n, mask_n,
                            Cin, H, W, Wo, Cout, K, KW, stride_h, stride_w, pad_h, pad_w,
                            sxb, sxc, sxh, sxw, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION)
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mean = tl.sum(z, axis=1) / Cout
    diff = tl.where(mask_n[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / Cout + eps)
    xhat = diff * rstd[:, None]
    rows = b.to(tl.int64) * Nout + offs_m
    offs = rows[:, None] * Cout + offs_n[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        wdy = dy * tl.load(gamma_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        wdy = dy
    # dz = rstd * (wdy - mean(xhat * wdy) * xhat - mean(wdy)); masked rows/cols give exactly 0
    c1 = tl.sum(xhat * wdy, axis=1) / Cout
    c2 = tl.sum(wdy, axis=1) / Cout
    dz = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    dz = tl.where(mask, dz, 0.0)
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    # per-program partial column sums (fp32) of dgamma, dbeta, dbias: rows of `part` (P, 3, Cout)
    pid = b * tl.num_programs(0) + pid_m
    part = part_ptr + pid.to(tl.int64) * 3 * Cout + offs_n
    tl.store(part, tl.sum(tl.where(mask, dy * xhat, 0.0), axis=0), mask=mask_n)
    tl.store(part + Cout, tl.sum(dy, axis=0), mask=mask_n)
    tl.store(part + 2 * Cout, tl.sum(dz, axis=0), mask=mask_n)


# ----------------------------------------------------------------------------------------------
# Launch configuration: the one place that decides tiles, warps and stages (the AOT test compiles
# exactly what `launch_config` returns at SegFormer's shapes).

def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_config(cout: int, k: int, dtype: torch.dtype, interpret: bool | None = None) -> dict:
    """Tiles for Cout output channels and a reduction of K = Cin*kh*kw, in ``dtype``.

    GPU: the fp32 accumulator is BLOCK_M x BLOCK_N and lives in registers together with the
    [BLOCK_M, BLOCK_K] implicit-GEMM address/mask tiles (64-bit pointers) and, in the backward,
    the dy / xhat / dz tiles of the LayerNorm backward. Measured with ptxas (tests/test_conv_
    layernorm.py AOT test): about 16 accumulator elements per thread keeps both kernels at
    <= 180 registers without spills at every Cout of SegFormer; BLOCK_M never drops below 16
    (the tensor-core minimum). BLOCK_K and stages keep the pipelined A+B tiles under 64 KB of
    shared memory (Triton buffers num_stages - 1 of them).
    """
    block_n = max(16, triton.next_power_of_2(cout))
    if interpret is None:
        interpret = interpreting()
    if interpret:
        # one config; few, fat programs keep the interpreter (about 0.6 ms per program) fast
        return dict(BLOCK_M=32, BLOCK_N=block_n, BLOCK_K=64, num_warps=4, num_stages=1)
    num_warps = 8 if block_n >= 256 else 4
    block_m = max(16, min(64, (16 * 32 * num_warps) // block_n))
    block_k = 16 if (block_n >= 256 or k <= 16) else 32
    esize = torch.empty((), dtype=dtype).element_size()
    stage_bytes = (block_m + block_n) * block_k * esize
    num_stages = max(2, min(3, 1 + (64 * 1024) // stage_bytes))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                num_stages=num_stages)


def _precision(dtype: torch.dtype, interpret: bool) -> tuple[bool, str]:
    """(UPCAST, INPUT_PRECISION): IEEE fp32 dots unless the user allowed TF32."""
    upcast = interpret and dtype == torch.bfloat16
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpret:
        return upcast, "tf32"
    return upcast, "ieee"


def weight_km(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, kh, kw) -> (K, Cout) with k = (kh, kw, cin), Cout contiguous."""
    cout = weight.shape[0]
    return weight.permute(2, 3, 1, 0).reshape(-1, cout).contiguous()


def out_size(h: int, w: int, kh: int, kw: int, stride, padding) -> tuple[int, int]:
    return ((h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1)


def _common(x, weight, stride, padding):
    B, Cin, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    Ho, Wo = out_size(H, W, KH, KW, stride, padding)
    return B, Cin, H, W, Cout, KH, KW, Ho, Wo


def conv_layernorm_fwd(x, weight, bias, gamma, beta, stride, padding, eps):
    """x: 4D with any strides (NCHW image or channels-last view of tokens). Returns tokens."""
    B, Cin, H, W, Cout, KH, KW, Ho, Wo = _common(x, weight, stride, padding)
    K = Cin * KH * KW
    out = torch.empty((B, Ho * Wo, Cout), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    interp = interpreting()
    cfg = launch_config(Cout, K, x.dtype, interp)
    upcast, prec = _precision(x.dtype, interp)
    wk = weight_km(weight)
    grid = (triton.cdiv(Ho * Wo, cfg["BLOCK_M"]), B)
    _conv_ln_fwd_kernel[grid](
        x, wk, bias if bias is not None else wk, gamma if gamma is not None else wk,
        beta if beta is not None else wk, out,
        Cin, H, W, Ho, Wo, Cout, K, KW, stride[0], stride[1], padding[0], padding[1],
        *x.stride(), float(eps),
        HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        UPCAST=upcast, INPUT_PRECISION=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def conv_layernorm_bwd_dz(dy, x, weight, bias, gamma, stride, padding, eps):
    """d(conv output) as tokens (B, H'W', Cout) in x's dtype, and fp32 (dgamma, dbeta, dbias)."""
    B, Cin, H, W, Cout, KH, KW, Ho, Wo = _common(x, weight, stride, padding)
    K = Cin * KH * KW
    dy = dy.contiguous()
    dz = torch.empty((B, Ho * Wo, Cout), device=x.device, dtype=x.dtype)
    interp = interpreting()
    cfg = launch_config(Cout, K, x.dtype, interp)
    upcast, prec = _precision(x.dtype, interp)
    wk = weight_km(weight)
    grid = (triton.cdiv(Ho * Wo, cfg["BLOCK_M"]), B)
    part = torch.empty((grid[0] * grid[1], 3, Cout), device=x.device, dtype=torch.float32)
    if dz.numel() == 0:
        part.zero_()
        dz.zero_()
    else:
        _conv_ln_bwd_kernel[grid](
            x, wk, bias if bias is not None else wk, gamma if gamma is not None else wk, dy, dz, part,
            Cin, H, W, Ho, Wo, Cout, K, KW, stride[0], stride[1], padding[0], padding[1],
            *x.stride(), float(eps),
            HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            UPCAST=upcast, INPUT_PRECISION=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    dgamma, dbeta, dbias = part.sum(0).unbind(0)
    return dz, dgamma, dbeta, dbias


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile description (analysis.aot.compile_report): the argument types and the
# 16-divisibility Triton sees at run time at SegFormer's shapes, per kernel and input layout.

_INT_ARGS = ("Cin", "H", "W", "Ho", "Wo", "Cout", "K", "KW", "stride_h", "stride_w", "pad_h", "pad_w",
             "sxb", "sxc", "sxh", "sxw")


def aot_spec(kernel: str, dtype: torch.dtype, cout: int, k: int, *, tokens: bool,
             divisible: tuple[str, ...] = ()) -> dict:
    """kwargs for ``compile_report`` reproducing a real launch of ``kernel`` ("fwd" or "bwd").

    tokens: x is the channels-last view of (B, N, Cin) tokens (sxc == 1, which Triton specialises
    to a constant exactly as at run time) or an NCHW image (sxw == 1). ``divisible``: the integer
    arguments that are multiples of 16 at the real shape (pointers always are: torch allocations).
    """
    cfg = launch_config(cout, k, dtype, interpret=False)
    upcast, prec = _precision(dtype, interpret=False)
    ty = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    if kernel == "fwd":
        fn = _conv_ln_fwd_kernel
        ptrs = ("x_ptr", "w_ptr", "bias_ptr", "gamma_ptr", "beta_ptr", "out_ptr")
        flags = dict(HAS_BIAS=True, HAS_GAMMA=True, HAS_BETA=True)
    else:
        fn = _conv_ln_bwd_kernel
        ptrs = ("x_ptr", "w_ptr", "bias_ptr", "gamma_ptr", "dy_ptr", "dz_ptr", "part_ptr")
        flags = dict(HAS_BIAS=True, HAS_GAMMA=True)
    one = "sxc" if tokens else "sxw"
    sig = {p: ("*fp32" if p == "part_ptr" else ty) for p in ptrs}
    sig.update({a: ("constexpr" if a == one else "i32") for a in _INT_ARGS})
    sig["eps"] = "fp32"
    constexprs = {one: 1, **flags, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                  "BLOCK_K": cfg["BLOCK_K"], "UPCAST": upcast, "INPUT_PRECISION": prec}
    sig.update({name: "constexpr" for name in constexprs if name != one})
    return dict(fn=fn, signature=sig, constexprs=constexprs,
                divisible_by_16=tuple(ptrs) + tuple(d for d in divisible if d != one),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def aot_reports(jobs: list[dict]) -> list[dict]:
    """Compile each job (kwargs of ``aot_spec`` + "arch") with ``analysis.aot.compile_report``.

    Must run in a process where TRITON_INTERPRET is off: under the interpreter @triton.jit (ours
    and triton.language's own helpers) yields functions that cannot be lowered. Tests call
    ``python -m segformer_fast.kernels.triton.conv_layernorm`` with the jobs as JSON on stdin.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ...analysis.aot import compile_report
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

    def one(job):
        job = dict(job)
        arch = job.pop("arch")
        job["dtype"] = names[job["dtype"]]
        job["divisible"] = tuple(job.get("divisible", ()))
        spec = aot_spec(**job)
        r = compile_report(spec.pop("fn"), spec.pop("signature"), spec.pop("constexprs"), arch, **spec)
        return dict(kernel=r.kernel, arch=r.arch, num_warps=r.num_warps, num_stages=r.num_stages,
                    registers=r.registers, spills=r.spills, shared_bytes=r.shared_bytes,
                    constexprs={k: v for k, v in r.constexprs.items() if k.startswith("BLOCK")})

    with ThreadPoolExecutor(2) as ex:     # ptxas is a subprocess: two compiles overlap
        return list(ex.map(one, jobs))


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(aot_reports(json.load(sys.stdin))))
