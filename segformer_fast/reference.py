"""The specification: one pure-PyTorch function per op.

Every backend is tested against these functions. They favour clarity over speed, work in any
dtype and device, and are differentiable by autograd. Signatures are the public ones of
``segformer_fast.ops`` (see DESIGN.md).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sra_attention",
    "dwconv_gelu",
    "conv_layernorm",
    "tokens_to_nchw",
    "nchw_to_tokens",
    "mlp_head_fuse",
    "upsample_sum",
    "resize_argmax",
]


def tokens_to_nchw(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W), the transpose every SegFormer codebase does."""
    B, N, C = x.shape
    H, W = hw
    return x.transpose(1, 2).reshape(B, C, H, W)


def nchw_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def sra_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float | None = None) -> Tensor:
    """Multi-head attention of N queries over M (spatially reduced) keys.

    q: (B, N, C); k, v: (B, M, C); head h owns channels h*d ... (h+1)*d with d = C // num_heads.
    Returns (B, N, C) = concat_h softmax(q_h k_h^T * scale) v_h, scale defaulting to d**-0.5.
    """
    B, N, C = q.shape
    M = k.shape[1]
    d = C // num_heads
    if scale is None:
        scale = d ** -0.5
    qh = q.reshape(B, N, num_heads, d).transpose(1, 2)
    kh = k.reshape(B, M, num_heads, d).transpose(1, 2)
    vh = v.reshape(B, M, num_heads, d).transpose(1, 2)
    attn = (qh @ kh.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return (attn @ vh).transpose(1, 2).reshape(B, N, C)


def dwconv_gelu(x: Tensor, hw: tuple[int, int], weight: Tensor, bias: Tensor | None,
                approximate: str = "none") -> Tensor:
    """Mix-FFN core: depthwise 3x3 conv (padding 1) + bias + GELU on tokens.

    x: (B, N, C) with N = H*W (row-major, as produced by ``flatten(2).transpose(1, 2)``);
    weight (C, 1, 3, 3); bias (C,) or None. ``approximate`` is "none" (erf) or "tanh".
    Returns (B, N, C).
    """
    C = x.shape[-1]
    y = F.conv2d(tokens_to_nchw(x, hw), weight, bias, stride=1, padding=1, groups=C)
    return F.gelu(nchw_to_tokens(y), approximate=approximate)


def conv_layernorm(x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None,
                   norm_bias: Tensor | None, stride: int | Sequence[int], padding: int | Sequence[int],
                   eps: float, hw: tuple[int, int] | None = None) -> tuple[Tensor, tuple[int, int]]:
    """Strided conv + LayerNorm over output channels, written as tokens.

    Serves the overlapping patch embedding (k7 s4 p3, k3 s2 p1) and the sequence reduction
    (k = s = sr, p = 0). x is an image (B, Cin, H, W), or tokens (B, N, Cin) with ``hw=(H, W)``.
    weight (Cout, Cin, kh, kw). Returns (tokens (B, H'*W', Cout), (H', W')).
    """
    if x.dim() == 3:
        if hw is None:
            raise ValueError("conv_layernorm: token input (B, N, C) needs hw=(H, W)")
        x = tokens_to_nchw(x, hw)
    y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    Ho, Wo = y.shape[-2:]
    y = F.layer_norm(nchw_to_tokens(y), (y.shape[1],), norm_weight, norm_bias, eps)
    return y, (Ho, Wo)


def mlp_head_fuse(features: Sequence[Tensor], proj_weights: Sequence[Tensor],
                  proj_biases: Sequence[Tensor | None], fuse_weight: Tensor) -> Tensor:
    """The All-MLP decoder up to (not including) BatchNorm, exactly as SegFormer writes it.

    features: 4 maps (B, C_i, H_i, W_i), stage 1 first. Each is projected to D channels by a
    per-pixel linear (proj_weights[i]: (D, C_i)), upsampled bilinearly (align_corners=False) to
    stage 1's size, concatenated in *reversed* order [c4, c3, c2, c1] and fused by a 1x1 conv
    fuse_weight (D, 4D[, 1, 1]) without bias. Returns (B, D, H_1, W_1).
    """
    size = features[0].shape[-2:]
    outs = []
    for f, w, b in zip(features, proj_weights, proj_biases):
        y = F.linear(nchw_to_tokens(f), w, b)                     # (B, HW, D)
        y = tokens_to_nchw(y, f.shape[-2:])
        if y.shape[-2:] != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        outs.append(y)
    fw = fuse_weight.reshape(fuse_weight.shape[0], -1, 1, 1)
    return F.conv2d(torch.cat(outs[::-1], dim=1), fw)


def upsample_sum(maps: Sequence[Tensor], hws: Sequence[tuple[int, int]], size: tuple[int, int],
                 bias: Tensor | None = None, scale: Tensor | None = None, shift: Tensor | None = None,
                 relu: bool = False) -> Tensor:
    """The folded decoder's epilogue: sum of bilinearly upsampled token maps, then affine + ReLU.

    maps[i]: tokens (B, H_i*W_i, D) with hws[i] = (H_i, W_i). Each is upsampled to ``size``
    (bilinear, align_corners=False, the index math of F.interpolate; a map already at ``size``
    passes unchanged), the maps are summed, then ``+ bias``, ``* scale + shift`` (BatchNorm in
    eval, folded) and ReLU, each only where given. Returns tokens (B, size[0]*size[1], D).
    """
    total = None
    for m, hw in zip(maps, hws):
        y = tokens_to_nchw(m, hw)
        if tuple(hw) != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        total = y if total is None else total + y
    total = nchw_to_tokens(total)
    if bias is not None:
        total = total + bias
    if scale is not None:
        total = total * scale
    if shift is not None:
        total = total + shift
    if relu:
        total = torch.relu(total)
    return total



def resize_argmax(logits: Tensor, size: tuple[int, int], align_corners: bool = False, *,
                  return_scores: bool = False):
    """Semantic segmentation post-processing: class logits (B, K, h, w) -> labels (B, H, W) int64.

    ``F.interpolate(logits.float(), size, mode="bilinear", align_corners=align_corners)`` then
    ``argmax`` over the K classes (the first index among equal maxima; a NaN score wins, as in
    ``torch.argmax``). With ``return_scores`` also the winning fp32 scores (B, H, W). Materialises the
    full-resolution (B, K, H, W) logits: the fused op exists to avoid exactly that.
    """
    up = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=align_corners)
    labels = up.argmax(1)
    if return_scores:
        return labels, up.gather(1, labels.unsqueeze(1)).squeeze(1)
    return labels
