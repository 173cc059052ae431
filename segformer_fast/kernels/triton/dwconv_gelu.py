"""Mix-FFN core on tokens: depthwise 3x3 conv (zero padding 1) + bias + GELU, forward and backward.

Tokens (B, N = H*W, C) are channels-last memory, so a tile of (BLOCK_P consecutive tokens x
BLOCK_C channels) is BLOCK_P rows of BLOCK_C contiguous values: every load and store is a
coalesced, vectorised row segment along C. The 3x3 neighbourhood of token p is the token
p + dh*W + dw; zero padding is a mask on (h + dh, w + dw) leaving the map. Neighbouring
tiles re-read the same input rows, which L1/L2 serve: HBM sees the input about once.

Kernels (no input checks, no autograd; see ``segformer_fast.ops.dwconv_gelu``):
- ``_fwd_kernel``: y = gelu(conv(x) + b). The pre-activation is not stored.
- ``_bwd_act_kernel``: recomputes pre = conv(x) + b (cheaper than writing and re-reading it in
  the forward: the backward reads x anyway) and writes g = dy * gelu'(pre) in x's dtype, as
  PyTorch's own GELU backward does.
- ``_bwd_conv_kernel``: dx[q] = sum_t w[t] * g[q - off_t] (the transposed depthwise conv) and,
  from the same shifted g tiles and one load of x[q], the per-program partial sums
  dw[t] += sum_q g[q - off_t] * x[q] and db += sum_q g[q] (fp32). Each program walks a fixed,
  strided list of tiles, so its partials are deterministic.
- ``_reduce_kernel``: sums the partial rows in a fixed order (deterministic, no atomics).

All math is fp32 (fp16/bf16 upcast on load, downcast on store), so the interpreter's bf16
arithmetic issue never arises.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LaunchConfig, load_vec, pow2_block, row_tile, store_buffer, stored

# Module constants used inside @triton.jit must be constexpr (the compiler refuses plain globals).
_SQRT1_2 = tl.constexpr(0.7071067811865476)        # 1/sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)   # 1/sqrt(2*pi)
_K0 = tl.constexpr(0.7978845608028654)             # sqrt(2/pi), tanh form
_K1 = tl.constexpr(0.044715)


@triton.jit
def _tanh(u):
    # tl has no tanh: 1 - 2/(exp(2u)+1) saturates correctly to +-1 for large |u| (exp -> inf/0).
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu(z, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        # tensor operand first: constexpr * tensor misbehaves in the interpreter
        t = _tanh((z + z * z * z * _K1) * _K0)
        y = 0.5 * z * (1.0 + t)
    else:
        y = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    return y


@triton.jit
def _gelu_grad(z, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        t = _tanh((z + z * z * z * _K1) * _K0)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _K0 * (1.0 + z * z * _K1 * 3.0)
    else:
        d = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * tl.exp(z * z * -0.5)
    return d


@triton.jit
def _conv3x3_tile(x_ptr, w_ptr, base, offs_p, h, w, mask_p, offs_c, mask_c, H, W, C,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 sum_t w[c, t] * x[p + off_t, c] over the 9 taps, zero outside the map."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in tl.static_range(3):
        for kw in tl.static_range(3):
            hh = h + (kh - 1)
            ww = w + (kw - 1)
            ok = mask_p & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            src = (offs_p + ((kh - 1) * W + (kw - 1))).to(tl.int64) * C
            xv = tl.load(x_ptr + base + src[:, None] + offs_c[None, :],
                         mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            # weight (C, 1, 3, 3): tap t of channel c at c*9 + t (tiny, cache resident).
            wv = tl.load(w_ptr + offs_c * 9 + (kh * 3 + kw), mask=mask_c, other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
    return acc


@triton.jit
def _preact_tile(x_ptr, w_ptr, b_ptr, N, H, W, C, HAS_BIAS: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of the pre-activation conv(x) + b (BLOCK_P, BLOCK_C) fp32, shared by
    the forward and the (recomputing) backward kernel, with the tile's flat int64 offsets into
    (B, N, C) tokens and its mask. Token tiles vary fastest across programs (axis 0), so
    concurrently running programs share input rows in L2."""
    b = tl.program_id(2)
    offs_p, offs_c, mask_p, mask_c = row_tile(tl.program_id(0), tl.program_id(1), N, C, BLOCK_P, BLOCK_C)
    base = b.to(tl.int64) * N * C
    pre = _conv3x3_tile(x_ptr, w_ptr, base, offs_p, offs_p // W, offs_p % W, mask_p, offs_c, mask_c,
                        H, W, C, BLOCK_P, BLOCK_C)
    if HAS_BIAS:
        pre += load_vec(b_ptr, offs_c, mask_c)
    off = base + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    return pre, off, mask_p[:, None] & mask_c[None, :]


# Kernel arguments: x, dy, g, dx (B, N = H*W, C) contiguous tokens; w (C, 1, 3, 3) contiguous;
# b (C,) (a dummy pointer when HAS_BIAS is False); part (G, 10, C) fp32; dw (C, 9) and db (C,) fp32.

@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, H, W, C,     # y (B, N, C)
                HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pre, off, m = _preact_tile(x_ptr, w_ptr, b_ptr, N, H, W, C, HAS_BIAS, BLOCK_P, BLOCK_C)
    tl.store(y_ptr + off, _gelu(pre, APPROX_TANH).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_act_kernel(x_ptr, w_ptr, b_ptr, dy_ptr, g_ptr, N, H, W, C,
                    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Recompute the pre-activation: the forward did not store it.
    pre, off, m = _preact_tile(x_ptr, w_ptr, b_ptr, N, H, W, C, HAS_BIAS, BLOCK_P, BLOCK_C)
    dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
    g = dy * _gelu_grad(pre, APPROX_TANH)
    tl.store(g_ptr + off, g.to(g_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_conv_kernel(x_ptr, g_ptr, w_ptr, dx_ptr, part_ptr, N, H, W, C, T, num_ptiles, iters,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_g = tl.program_id(0)
    pid_c = tl.program_id(1)
    G = tl.num_programs(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    rows = tl.arange(0, 16)   # partial rows: 0..8 the taps of dw, 9 db (padded to 16)
    part = tl.zeros([16, BLOCK_C], dtype=tl.float32)
    # Tile t = pid_g + i*G: at step i the running programs hold adjacent tiles (L2 sharing);
    # the order within a program is fixed, so the partials are deterministic.
    for i in range(iters):
        t = pid_g + i * G
        b = t // num_ptiles
        offs_p = (t % num_ptiles) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = (offs_p < N) & ((offs_p * 0 + t) < T)   # tensor-shaped: tiles past T are empty
        h = offs_p // W
        w = offs_p % W
        base = b.to(tl.int64) * N * C
        own = base + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
        m = mask_p[:, None] & mask_c[None, :]
        xq = tl.load(x_ptr + own, mask=m, other=0.0).to(tl.float32)
        dx = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for kh in tl.static_range(3):
            for kw in tl.static_range(3):
                # Output p = q - off_t feeds input q through tap t (transposed conv).
                hh = h - (kh - 1)
                ww = w - (kw - 1)
                ok = mask_p & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                src = (offs_p - ((kh - 1) * W + (kw - 1))).to(tl.int64) * C
                gv = tl.load(g_ptr + base + src[:, None] + offs_c[None, :],
                             mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
                wv = tl.load(w_ptr + offs_c * 9 + (kh * 3 + kw), mask=mask_c, other=0.0).to(tl.float32)
                dx += gv * wv[None, :]
                dw_t = tl.sum(gv * xq, axis=0)
                part += tl.where(rows[:, None] == kh * 3 + kw, dw_t[None, :], 0.0)
                if kh * 3 + kw == 4:   # centre tap: g at q itself
                    part += tl.where(rows[:, None] == 9, tl.sum(gv, axis=0)[None, :], 0.0)
        tl.store(dx_ptr + own, dx.to(dx_ptr.dtype.element_ty), mask=m)
    dst = part_ptr + pid_g.to(tl.int64) * 10 * C + rows[:, None] * C + offs_c[None, :]
    tl.store(dst, part, mask=(rows[:, None] < 10) & mask_c[None, :])


@triton.jit
def _reduce_kernel(part_ptr, dw_ptr, db_ptr, G, C, BLOCK_C: tl.constexpr):
    # dw (C, 9): dw[c, t] = sum_g part[g, t, c]; db (C,): sum_g part[g, 9, c]; summed in the
    # order g = 0, 1, ... (deterministic).
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.arange(0, 16)
    m = (rows[:, None] < 10) & (offs_c[None, :] < C)
    acc = tl.zeros([16, BLOCK_C], dtype=tl.float32)
    ptrs = part_ptr + rows[:, None] * C + offs_c[None, :]
    for _ in range(G):
        acc += tl.load(ptrs, mask=m, other=0.0)
        ptrs += 10 * C
    tl.store(dw_ptr + offs_c[None, :] * 9 + rows[:, None], acc, mask=m & (rows[:, None] < 9))
    tl.store(db_ptr + offs_c[None, :] + rows[:, None] * 0, acc, mask=m & (rows[:, None] == 9))


# ---------------------------------------------------------------------------------------------
# Launch configuration: the one place that picks tiles (``python -m segformer_fast kernels``
# compiles what the launchers launch with it).

# Backward conv programs: ~4 per SM of an H100 (132 SMs), 8 warps each, each looping over
# many token tiles; bounds the fp32 partials to 512 * 10 * BLOCK_C * 4 B = 2.6 MB.
BWD_TARGET_PROGRAMS = 512


def block_c(C: int) -> int:
    """128 channels per tile (16 B vectors per thread in fp16, 512 B row segments in fp32);
    every real SegFormer hidden size (128 ... 2048) is a multiple of 128, so no channel mask
    is ever partial there. Small C gets a smaller power of two (>= 16)."""
    return pow2_block(C, hi=128)


def launch_config(kernel: str, C: int) -> LaunchConfig:
    """Tiles of ``kernel`` ("fwd", "bwd_act", "bwd_conv", "reduce") for C channels.

    The three token-tile kernels share one: 8 tokens x 128 channels over 8 warps, 4 outputs per
    thread, each a 4-wide contiguous channel vector (8 B fp16 / 16 B fp32; a warp covers one
    256/512 B row segment). ptxas hoists the 9 tap loads per output for latency, so registers
    scale with outputs per thread: 16 x 128 over 4 warps took 154-214 registers, and in the
    backward conv kernel 16-32 x 128 tiles reached 255 registers with spills on sm_90
    (measured with ptxas). The reduction sums (G, 10, C) partial rows, one channel tile each."""
    bc = block_c(C)
    if kernel in ("fwd", "bwd_act", "bwd_conv"):
        return LaunchConfig(BLOCK_P=max(8, 1024 // bc), BLOCK_C=bc, num_warps=8)
    if kernel == "reduce":
        return LaunchConfig(BLOCK_C=bc, num_warps=4)
    raise ValueError(f"unknown kernel {kernel!r}")


def bwd_partial_rows(B: int, N: int, C: int, target: int | None = None) -> int:
    cfg = launch_config("bwd_conv", C)
    tiles = B * triton.cdiv(N, cfg["BLOCK_P"])
    n_c = triton.cdiv(C, cfg["BLOCK_C"])
    target = BWD_TARGET_PROGRAMS if target is None else target
    return max(1, min(tiles, target // n_c if target >= n_c else 1))


# ---------------------------------------------------------------------------------------------
# Launchers: contiguous tensors in, contiguous tensors out.

def forward(x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None,
            approximate: str) -> torch.Tensor:
    """y = gelu(dwconv3x3(x) + bias) on contiguous tokens x (B, H*W, C)."""
    B, N, C = x.shape
    y = store_buffer(x.shape, x.dtype, x.device)
    cfg = launch_config("fwd", C)
    grid = (triton.cdiv(N, cfg["BLOCK_P"]), triton.cdiv(C, cfg["BLOCK_C"]), B)
    _fwd_kernel[grid](x, weight, bias if bias is not None else weight, y, N, H, W, C,
                      HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", **cfg.kwargs())
    return stored(y, x.dtype)


def backward(dy: torch.Tensor, x: torch.Tensor, H: int, W: int, weight: torch.Tensor,
             bias: torch.Tensor | None, approximate: str, partial_rows: int | None = None):
    """(dx, dweight (C,1,3,3), dbias (C,)) for contiguous dy, x (B, H*W, C).

    ``partial_rows`` overrides the number of backward-conv programs along the token axis
    (tests use it to exercise the multi-tile loop on tiny shapes)."""
    B, N, C = x.shape
    g = store_buffer(x.shape, x.dtype, x.device)
    cfg = launch_config("bwd_act", C)
    grid = (triton.cdiv(N, cfg["BLOCK_P"]), triton.cdiv(C, cfg["BLOCK_C"]), B)
    _bwd_act_kernel[grid](x, weight, bias if bias is not None else weight, dy, g, N, H, W, C,
                          HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", **cfg.kwargs())
    g = stored(g, x.dtype)          # the GPU keeps g in the input dtype: so does the interpreter

    cfg = launch_config("bwd_conv", C)
    num_ptiles = triton.cdiv(N, cfg["BLOCK_P"])
    T = B * num_ptiles
    G = partial_rows if partial_rows is not None else bwd_partial_rows(B, N, C)
    G = max(1, min(G, T))
    iters = triton.cdiv(T, G)
    dx = store_buffer(x.shape, x.dtype, x.device)
    part = torch.empty((G, 10, C), device=x.device, dtype=torch.float32)
    _bwd_conv_kernel[(G, triton.cdiv(C, cfg["BLOCK_C"]))](
        x, g, weight, dx, part, N, H, W, C, T, num_ptiles, iters, **cfg.kwargs())

    cfg = launch_config("reduce", C)
    dw = torch.empty((C, 1, 3, 3), device=x.device, dtype=torch.float32)
    db = torch.empty((C,), device=x.device, dtype=torch.float32)
    _reduce_kernel[(triton.cdiv(C, cfg["BLOCK_C"]),)](part, dw, db, G, C, **cfg.kwargs())
    dweight = dw.to(weight.dtype)
    dbias = db.to(bias.dtype if bias is not None else weight.dtype)
    return stored(dx, x.dtype), dweight, dbias
