"""Triton kernels for the folded SegFormer decoder's epilogue: ``upsample_sum``.

Forward: every output pixel of the stage-1 grid (H/4) gathers the 2x2 bilinear stencil of each
low-resolution folded map, sums them with the stage-1 map, adds the folded bias, applies the
eval-mode BatchNorm affine and ReLU and writes the feature once. No concat, no upsampled
intermediates: HBM traffic is one write of the output plus (cache-friendly) reads of the small
maps, instead of 3 upsampled D-channel maps written and read again, a 4D-channel concat and the
4D->D 1x1 conv at full resolution.

Backward:
- ``_epilogue_bwd_kernel`` (only when scale/shift/ReLU are given): recomputes the pre-activation
  sum from the maps (cheaper than saving a full-resolution tensor), applies the ReLU mask and the
  scale, writes dz in fp32 and per-tile partial sums for dbias/dscale/dshift (reduced by the
  launcher in a fixed order: deterministic, no atomics).
- ``_upsample_adjoint_kernel``: the adjoint of bilinear upsampling as a *gather* per low-resolution
  index, separably (along W, then along H: bilinear weights are a product): each low-res index
  visits the window of output indices whose stencil can touch it and accumulates weight * dz, the
  weight recomputed by exactly the forward's index math (outside the true stencil it is 0 and the
  load is masked off). Deterministic, no atomics, each element written once.

All tensors are tokens (B, H*W, D) with channels contiguous, the layout SegFormer already has, so
every load/store is a vector along D (coalesced, 16-byte vectorised).

Index math (F.interpolate, bilinear, align_corners=False): ``scale = in / out`` in fp32,
``src = max((dst + 0.5) * scale - 0.5, 0)``, ``i0 = min(floor(src), in - 1)``,
``i1 = i0 + (i0 < in - 1)``, ``lambda = clamp(src - i0, 0, 1)``.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .common import LaunchConfig, load_vec, pow2_block, row_tile, store_buffer, stored


def launch_config(kernel: str, inner: int) -> LaunchConfig:
    """The one place launch configurations are chosen; ``inner`` is the contiguous extent a
    program tiles: D channels for "fwd" and "epilogue_bwd", D or a whole low-res row w*D for
    "adjoint".

    fwd/epilogue_bwd: BLOCK_D up to 128 channels per program (a warp reads 32 x 4 contiguous
    fp32 = 512 B rows); BLOCK_P 32 output pixels. 8 warps: 16 fp32 accumulators per thread, and
    the compiler hoists all 13 stencil loads (4 corners x 3 maps + the stage-1 map) for latency
    hiding, so 4 warps (32 values per load per thread) ran out of registers on sm_90 (255 +
    spills). adjoint: 32 low-res indices x up to 128 contiguous elements per program, 4 warps:
    32 fp32 accumulators per thread. The same rule runs under the interpreter (one
    configuration, no autotuning).
    """
    if kernel in ("fwd", "epilogue_bwd"):
        return LaunchConfig(BLOCK_P=32, BLOCK_D=pow2_block(inner, hi=128), num_warps=8)
    if kernel == "adjoint":
        return LaunchConfig(BLOCK_Q=32, BLOCK_I=pow2_block(inner, hi=128), num_warps=4)
    raise ValueError(f"unknown kernel {kernel!r}")


@functools.lru_cache(maxsize=1024)
def fp32_ratio(n_in: int, n_out: int) -> float:
    """``n_in / n_out`` as an IEEE fp32 division, exactly as PyTorch computes the bilinear scale
    (not the double quotient rounded to fp32, which can differ by double rounding)."""
    return torch.tensor(n_in, dtype=torch.float32).div(n_out).item()


# ----------------------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _src_index(dst, scale, n_in):
    """PyTorch's align_corners=False source index: (i0, i1, lambda1) for integer dst."""
    src = (dst.to(tl.float32) + 0.5) * scale - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)          # src >= 0: truncation is floor
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = i0 + (i0 < n_in - 1).to(tl.int32)
    return i0, i1, lam


@triton.jit
def _accumulate_map(acc, m_ptr, pid_b, oh, ow, offs_d, pmask, dmask, h, w, sh, sw, D,
                    UP: tl.constexpr):
    """acc += bilinear sample of one (B, h*w, D) map at output pixels (oh, ow) (or the map
    itself when UP is False, i.e. it already has the output size)."""
    base = m_ptr + pid_b.to(tl.int64) * h * w * D
    mask = pmask[:, None] & dmask[None, :]
    if UP:
        y0, y1, ly = _src_index(oh, sh, h)
        x0, x1, lx = _src_index(ow, sw, w)
        d = offs_d[None, :]
        v00 = tl.load(base + ((y0 * w + x0) * D)[:, None] + d, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(base + ((y0 * w + x1) * D)[:, None] + d, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(base + ((y1 * w + x0) * D)[:, None] + d, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(base + ((y1 * w + x1) * D)[:, None] + d, mask=mask, other=0.0).to(tl.float32)
        lx = lx[:, None]
        ly = ly[:, None]
        # same association as PyTorch: h0l*(w0l*v00 + w1l*v01) + h1l*(w0l*v10 + w1l*v11)
        top = (1.0 - lx) * v00 + lx * v01
        bot = (1.0 - lx) * v10 + lx * v11
        acc += (1.0 - ly) * top + ly * bot
    else:
        pix = oh * w + ow
        acc += tl.load(base + (pix * D)[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _summed_tile(maps, geom, bias_ptr, H, W, D, UP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile of z = sum of the (upsampled) maps + bias (BLOCK_P, BLOCK_D) fp32,
    shared by the forward and the (recomputing) epilogue backward, with the tile's flat int64
    offsets into (B, H*W, D), its pixel and channel masks and channel offsets."""
    pid_b = tl.program_id(2)
    offs_p, offs_d, pmask, dmask = row_tile(tl.program_id(0), tl.program_id(1), H * W, D, BLOCK_P, BLOCK_D)
    oh = offs_p // W
    ow = offs_p % W
    z = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(len(maps)):        # unrolled: one to four maps
        h, w, sh, sw = geom[k]
        z = _accumulate_map(z, maps[k], pid_b, oh, ow, offs_d, pmask, dmask, h, w, sh, sw, D, UP[k])
    if HAS_BIAS:
        z += load_vec(bias_ptr, offs_d, dmask)
    tile = pid_b.to(tl.int64) * H * W * D + (offs_p * D)[:, None] + offs_d[None, :]
    return z, tile, pmask, dmask, offs_d


# Kernel arguments: out, g (the incoming gradient), dz (B, H*W, D) tokens (dz fp32); maps a tuple
# of one to four (B, h_k*w_k, D) tokens; geom a tuple of (h_k, w_k, sh_k, sw_k) per map, with
# sh_k = h_k/H and sw_k = w_k/W as fp32 quotients; UP a constexpr tuple, True where map k is
# upsampled (False: it already has the output size); bias, scale, shift (D,) (dummies when their
# HAS_* is False); part (3, B*n_pblocks, D) fp32.

@triton.jit
def _upsample_sum_fwd_kernel(out_ptr, maps, geom, bias_ptr, scale_ptr, shift_ptr, H, W, D,
                             UP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                             HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    acc, tile, pmask, dmask, offs_d = _summed_tile(maps, geom, bias_ptr, H, W, D, UP, HAS_BIAS,
                                                   BLOCK_P, BLOCK_D)
    # epilogue in fp32, in the reference's order: + bias (above), * scale, + shift, ReLU
    if HAS_SCALE:
        acc *= load_vec(scale_ptr, offs_d, dmask)
    if HAS_SHIFT:
        acc += load_vec(shift_ptr, offs_d, dmask)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _epilogue_bwd_kernel(dz_ptr, part_ptr, g_ptr, maps, geom, bias_ptr, scale_ptr, shift_ptr,
                         H, W, D, n_pblocks, UP: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """dz = d out / d(sum of maps); partials [3, B * n_pblocks, D] of dbias, dscale, dshift."""
    z, tile, pmask, dmask, offs_d = _summed_tile(maps, geom, bias_ptr, H, W, D, UP, HAS_BIAS,
                                                 BLOCK_P, BLOCK_D)
    mask = pmask[:, None] & dmask[None, :]
    g = tl.load(g_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s = load_vec(scale_ptr, offs_d, dmask)
        u = z * s
    else:
        u = z
    if HAS_SHIFT:
        u += load_vec(shift_ptr, offs_d, dmask)
    if RELU:
        g = tl.where(u > 0.0, g, 0.0)       # threshold_backward: gradient only where out > 0
    if HAS_SCALE:
        dz = g * s
    else:
        dz = g
    tl.store(dz_ptr + tile, dz, mask=mask)
    row = (tl.program_id(2) * n_pblocks + tl.program_id(0)).to(tl.int64) * D + offs_d
    plane = n_pblocks * tl.num_programs(2) * D
    tl.store(part_ptr + row, tl.sum(dz, axis=0), mask=dmask)              # dbias
    tl.store(part_ptr + plane + row, tl.sum(g * z, axis=0), mask=dmask)   # dscale
    tl.store(part_ptr + 2 * plane + row, tl.sum(g, axis=0), mask=dmask)   # dshift


@triton.jit
def _axis_weight(o, i, scale, n_in, n_out):
    """Weight with which output index o reads input index i along one axis (0 if it does not)."""
    i0, i1, lam = _src_index(o, scale, n_in)
    wgt = tl.where(i0 == i, 1.0 - lam, 0.0) + tl.where(i1 == i, lam, 0.0)
    return tl.where((o >= 0) & (o < n_out), wgt, 0.0)


@triton.jit
def _upsample_adjoint_kernel(
        dx_ptr, dz_ptr,     # dx (B, OUTER, L_in, INNER), dz (B, OUTER, L_out, INNER), contiguous
        OUTER, L_out, L_in, INNER, scale, inv_scale, K,     # scale = L_in/L_out (fp32), K: window()
        BLOCK_Q: tl.constexpr, BLOCK_I: tl.constexpr):
    """Adjoint of 1-D linear upsampling L_in -> L_out along the middle axis of a contiguous
    (B, OUTER, L, INNER) tensor: dx[b, o, i, :] = sum_l weight(l, i) * dz[b, o, l, :].

    Each low-res index i gathers from the K output indices whose stencil can reach it (start from
    the inverted index map with one index of slack; the exact weight recomputed with the forward's
    index math is 0 outside the stencil and those loads are masked off)."""
    pid_q = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    qmask = offs_q < OUTER * L_in
    imask = offs_i < INNER
    o = offs_q // L_in
    i = offs_q % L_in
    # first output index that can read i: src(l) >= i - 1  <=>  l >= (i - 0.5) * out/in - 0.5
    lo = tl.maximum(((i.to(tl.float32) - 0.5) * inv_scale - 0.5).to(tl.int32) - 1, 0)
    rows = dz_ptr + pid_b.to(tl.int64) * OUTER * L_out * INNER + (o * L_out).to(tl.int64) * INNER
    acc = tl.zeros((BLOCK_Q, BLOCK_I), dtype=tl.float32)
    for k in range(0, K):
        l = lo + k
        wgt = _axis_weight(l, i, scale, L_in, L_out)
        live = qmask & (wgt != 0.0)                    # outside the stencil: not even loaded
        v = tl.load(rows[:, None] + (l * INNER)[:, None] + offs_i[None, :],
                    mask=live[:, None] & imask[None, :], other=0.0).to(tl.float32)
        acc += wgt[:, None] * v
    out = (dx_ptr + pid_b.to(tl.int64) * OUTER * L_in * INNER
           + (offs_q.to(tl.int64) * INNER)[:, None] + offs_i[None, :])
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=qmask[:, None] & imask[None, :])


# ----------------------------------------------------------------------------------------------
# launchers (no checks: ops/upsample_sum.py validated the inputs)
# ----------------------------------------------------------------------------------------------
def _map_args(hws, size):
    """(geom, UP): per map (h, w, h/H, w/W) with the ratios as fp32 quotients, and whether the
    map is upsampled."""
    H, W = size
    geom = tuple((h, w, fp32_ratio(h, H), fp32_ratio(w, W)) for h, w in hws)
    return geom, tuple((h, w) != (H, W) for h, w in hws)


def upsample_sum_fwd(maps, hws, size, bias=None, scale=None, shift=None, relu=False):
    """Launch the forward kernel; returns tokens (B, H*W, D) in the maps' dtype."""
    B, _, D = maps[0].shape
    H, W = size
    out = store_buffer((B, H * W, D), maps[0].dtype, maps[0].device)
    cfg = launch_config("fwd", D)
    geom, up = _map_args(hws, size)
    dummy = maps[0]
    grid = (triton.cdiv(H * W, cfg["BLOCK_P"]), triton.cdiv(D, cfg["BLOCK_D"]), B)
    _upsample_sum_fwd_kernel[grid](
        out, tuple(maps), geom, bias if bias is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy, H, W, D,
        UP=up, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        RELU=bool(relu), **cfg.kwargs())
    return stored(out, maps[0].dtype)


def epilogue_bwd(grad, maps, hws, size, bias, scale, shift, relu):
    """Launch the epilogue backward: returns (dz fp32 (B, H*W, D), dbias, dscale, dshift) with the
    parameter gradients as fp32 (D,) vectors (reduced here, in a fixed order)."""
    B, _, D = maps[0].shape
    H, W = size
    cfg = launch_config("epilogue_bwd", D)
    n_pb = triton.cdiv(H * W, cfg["BLOCK_P"])
    dz = torch.empty((B, H * W, D), device=grad.device, dtype=torch.float32)
    part = torch.empty((3, B * n_pb, D), device=grad.device, dtype=torch.float32)
    geom, up = _map_args(hws, size)
    dummy = maps[0]
    grid = (n_pb, triton.cdiv(D, cfg["BLOCK_D"]), B)
    _epilogue_bwd_kernel[grid](
        dz, part, grad.contiguous(), tuple(maps), geom, bias if bias is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        H, W, D, n_pb, UP=up, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        RELU=bool(relu), **cfg.kwargs())
    # three separate reductions: the results must not alias one another (custom-op outputs)
    return dz, part[0].sum(dim=0), part[1].sum(dim=0), part[2].sum(dim=0)


def window(n_in: int, n_out: int) -> int:
    """Loop length of the adjoint's gather along one axis: the widest range of output indices
    between the kernel's start (floor, one index of slack) and the true stencil's end (plus one),
    plus one more for fp32-vs-fp64 rounding of the start."""
    inv = n_out / n_in
    widest = 0
    for i in range(n_in):
        lo = max(math.floor((i - 0.5) * inv - 0.5) - 1, 0)
        hi = min(n_out, math.floor((i + 1.5) * inv - 0.5) + 2)
        widest = max(widest, hi - lo)
    return widest + 1


def _adjoint_1d(dz, B, outer, l_out, l_in, inner, dtype):
    cfg = launch_config("adjoint", inner)
    dx = store_buffer((B, outer * l_in * inner), dtype, dz.device)
    grid = (triton.cdiv(outer * l_in, cfg["BLOCK_Q"]), triton.cdiv(inner, cfg["BLOCK_I"]), B)
    _upsample_adjoint_kernel[grid](
        dx, dz, outer, l_out, l_in, inner, fp32_ratio(l_in, l_out), l_out / l_in,
        window(l_in, l_out), **cfg.kwargs())
    return stored(dx, dtype)


def upsample_adjoint(dz, hw, size, dtype):
    """Gradient of a (h, w) map upsampled to ``size`` from dz (B, H*W, D): separable, first along
    W (dz -> fp32 (B, H, w, D)), then along H (-> (B, h, w, D) in ``dtype``): K_W + K_H gather
    steps per element instead of K_W * K_H for a 2-D window."""
    B, _, D = dz.shape
    H, W = size
    h, w = hw
    t = dz
    if w != W:
        t = _adjoint_1d(t, B, H, W, w, D, torch.float32 if h != H else dtype)
    if h != H:
        t = _adjoint_1d(t, B, 1, H, h, w * D, dtype)
    return t.view(B, h * w, D).to(dtype)
