"""Triton kernel of the fused post-processing ``resize_argmax``: class logits (B, K, h, w) ->
labels (B, H, W) int64 (and the winning fp32 score), never writing full-resolution logits.

One program owns BLOCK_P consecutive output pixels of one image: it loads their source indices and
weights from the op's tables once, then loops over the K classes, gathering the 2x2 stencil of each
class plane (neighbouring output pixels share source pixels: the loads hit L1/L2), interpolating in
fp32 and keeping a running maximum and its class index in registers. HBM traffic: the logits read
about once per pixel tile plus one int64 label (and optionally one fp32 score) written per pixel,
instead of K fp32 scores written and read back at full resolution.

Arithmetic is the op's (segformer_fast/ops/resize_argmax.py): ``t = l0x*v0 + l1x*v1`` along W,
``s = l0y*t0 + l1y*t1`` along H, each rounded to fp32: the launch passes
``enable_fp_fusion=False`` so the GPU compile keeps separate multiplies and adds like PyTorch's
tables-based rule (the interpreter never fuses). A class replaces the best when its score is
greater, or NaN while the best is not (lowest index among equal scores; NaN wins).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LaunchConfig


def launch_config(kernel: str) -> LaunchConfig:
    """The one place launch configurations are chosen. "fwd": 256 output pixels per program over
    4 warps (2 per thread: 4 gathers each per class, a handful of live registers), no tiling over
    classes (the loop over K carries only the running best and its index)."""
    if kernel == "fwd":
        return LaunchConfig(BLOCK_P=256, num_warps=4)
    raise ValueError(f"unknown kernel {kernel!r}")


# Kernel arguments: logits (B, K, h, w) contiguous in fp32/fp16/bf16; labels (B, H, W) int64;
# scores (B, H, W) fp32 (a dummy when HAS_SCORES is False); yi0, yi1 (H,) int32 and wy0, wy1 (H,)
# fp32: the source rows and their weights per output row; xi0, xi1, wx0, wx1 (W,): the same along W.
@triton.jit
def _resize_argmax_kernel(logits, labels, scores, yi0, yi1, wy0, wy1, xi0, xi1, wx0, wx1,
                          K, h, w, H, W, HAS_SCORES: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < H * W
    oy = offs // W
    ox = offs % W
    y0 = tl.load(yi0 + oy, mask=mask, other=0)
    y1 = tl.load(yi1 + oy, mask=mask, other=0)
    ly0 = tl.load(wy0 + oy, mask=mask, other=0.0)
    ly1 = tl.load(wy1 + oy, mask=mask, other=0.0)
    x0 = tl.load(xi0 + ox, mask=mask, other=0)
    x1 = tl.load(xi1 + ox, mask=mask, other=0)
    lx0 = tl.load(wx0 + ox, mask=mask, other=0.0)
    lx1 = tl.load(wx1 + ox, mask=mask, other=0.0)
    o00 = y0 * w + x0
    o01 = y0 * w + x1
    o10 = y1 * w + x0
    o11 = y1 * w + x1
    plane = h * w
    base = logits + pid_b.to(tl.int64) * K * plane
    v00 = tl.load(base + o00, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(base + o01, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(base + o10, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(base + o11, mask=mask, other=0.0).to(tl.float32)
    best = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
    idx = tl.zeros((BLOCK_P,), dtype=tl.int32)
    for k in range(1, K):
        p = base + k * plane
        v00 = tl.load(p + o00, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(p + o01, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(p + o10, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(p + o11, mask=mask, other=0.0).to(tl.float32)
        v = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
        take = (v > best) | ((v != v) & (best == best))
        best = tl.where(take, v, best)
        idx = tl.where(take, k, idx)
    out = pid_b.to(tl.int64) * H * W + offs
    tl.store(labels + out, idx.to(tl.int64), mask=mask)
    if HAS_SCORES:
        tl.store(scores + out, best, mask=mask)


def resize_argmax_fwd(logits, yi0, yi1, wy0, wy1, xi0, xi1, wx0, wx1, size, return_scores):
    """logits (B, K, h, w) contiguous; the op's tables; size (H, W) -> (labels (B, H, W) int64,
    scores (B, H, W) fp32, or an empty (0,) tensor unless ``return_scores``)."""
    B, K, h, w = logits.shape
    H, W = size
    labels = torch.empty((B, H, W), dtype=torch.int64, device=logits.device)
    scores = torch.empty((B, H, W) if return_scores else (0,), dtype=torch.float32, device=logits.device)
    cfg = launch_config("fwd")
    grid = (triton.cdiv(H * W, cfg["BLOCK_P"]), B)
    _resize_argmax_kernel[grid](
        logits, labels, scores if return_scores else labels, yi0, yi1, wy0, wy1, xi0, xi1, wx0, wx1,
        K, h, w, H, W, HAS_SCORES=return_scores, enable_fp_fusion=False, **cfg.kwargs())
    return labels, scores
