"""SegFormer's All-MLP head with ``linear_fuse`` reassociated before the upsampling.

The head computes ``fuse(concat_i(up(L_i x_i + b_i)))``. Bilinear upsampling is linear per
channel, so it commutes with every per-pixel linear map, and

    fuse(concat_i(up(L_i x_i + b_i))) = sum_i up((F_i L_i) x_i) + sum_i F_i b_i

with F_i the column block of ``linear_fuse`` that meets stage i. The D x C_i product is applied
at each stage's own resolution, so the 4D -> D 1x1 conv at H/4 (more than half of all FLOPs of
B0/B2) disappears; what remains at H/4 is one fused gather (``ops.upsample_sum``) that also
applies the folded bias, eval BatchNorm and ReLU. Exact in real arithmetic, training and eval:

- eval / no grad: the folded weights are cached on the head, keyed on the identity and version
  counter of every tensor they come from (an optimizer step or ``load_state_dict`` bumps the
  version); never while tracing (torch.compile / export fold inside the graph) and never from
  inference tensors (they have no version counter): those fold on every call.
- training with grad: the product is recomputed inside autograd, so gradients reach the original
  weights; per stage the cheaper association is used. BatchNorm then runs as the original module
  (batch statistics, running buffers) on the pre-BN sum; dropout placement is unchanged.

mmseg's per-stage modules are ConvModules (conv + BN + ReLU): non-linear, so nothing folds into
them (``opaque_stages``); they run as they are and only F_i moves before the upsampling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.upsample_sum import upsample_sum
from ._onednn import linear, usable
from ._parts import hookless, plain

__all__ = ["HeadParts", "folded_head", "head_unfusable"]


@dataclass
class HeadParts:
    """One head's pieces, named by the codebase adapter (all live modules of the user's head)."""

    stages: Sequence[nn.Module]      # per-stage projections, stage 1 first (nn.Linear C_i -> D),
    #                                  or whole per-stage modules (NCHW in/out) when ``opaque``
    fuse: nn.Module                  # 1x1 conv n*D -> D (no activation)
    bn: nn.Module | None = None
    act: nn.Module | None = None
    dropout: nn.Module | None = None
    classifier: nn.Module | None = None
    reversed_concat: bool = True     # the head concatenates [c_n, ..., c_1] (All-MLP) or [c_1, ...]
    opaque: bool = False


def head_unfusable(p: HeadParts) -> str | None:
    """Why the head's arithmetic cannot be refolded exactly (None: it can). Folding reads
    weights, so every folded module must be exactly its weights (no LoRA, no hooks)."""
    n = len(p.stages)
    if not plain(p.fuse, nn.Conv2d):
        return f"linear_fuse is a {type(p.fuse).__name__} (or has hooks), not a plain nn.Conv2d"
    D = p.fuse.weight.shape[0]
    if (tuple(p.fuse.weight.shape) != (D, n * D, 1, 1) or p.fuse.groups != 1
            or p.fuse.stride != (1, 1) or p.fuse.padding not in ((0, 0), "valid")):
        return f"linear_fuse must be a 1x1 conv {n}*D -> D, got {p.fuse!r}"
    for i, proj in enumerate(p.stages):
        if p.opaque:
            continue
        if not plain(proj, nn.Linear) or proj.weight.shape[0] != D:
            return f"stage {i} projection must be a plain nn.Linear(C_i, {D}), got {type(proj).__name__}"
    return None


def _bn_foldable(bn) -> bool:
    return (isinstance(bn, nn.modules.batchnorm._BatchNorm) and hookless(bn) and not bn.training
            and bn.running_mean is not None and bn.running_var is not None)


def _fold(p: HeadParts, tokens_per_stage: Sequence[int] | None, dtype):
    """Per stage ("w", D x C_i folded weight), ("seq", W_i, F_i) for the low-resolution two-step
    association, or ("f", F_i) after an opaque stage module; the folded bias; whether an
    eval-mode BatchNorm was folded in too (then it is an affine map per channel, folded into
    every stage's rows and the bias; ReLU is all that is left after the upsample-sum)."""
    fuse, n = p.fuse, len(p.stages)
    D = fuse.weight.shape[0]
    fw = fuse.weight.reshape(D, n * D)
    bias = fuse.bias
    bn_folded = _bn_foldable(p.bn)
    if bn_folded:
        bn = p.bn
        acc = torch.promote_types(bn.running_var.dtype, torch.float32)   # fp32 at least
        inv = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        scale = inv if bn.weight is None else bn.weight.to(acc) * inv
        shift = -bn.running_mean.to(acc) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(acc)
        fw = fw.to(acc) * scale[:, None]
        bias = shift if bias is None else bias.to(acc) * scale + shift
    stages = []
    for i, proj in enumerate(p.stages):
        j = n - 1 - i if p.reversed_concat else i          # stage i's block of the concat
        blk = fw[:, j * D:(j + 1) * D]
        if p.opaque:
            stages.append(("f", blk.to(dtype)))
            continue
        C = proj.weight.shape[1]
        tokens = None if tokens_per_stage is None else tokens_per_stage[i]
        # a symbolic token count (export / dynamic compile) folds: choosing by it would guard the
        # traced program to one side of C < B*H_i*W_i
        if tokens is None or not isinstance(tokens, int) or C < tokens:
            stages.append(("w", (blk @ proj.weight.to(blk.dtype)).to(dtype)))
        else:
            stages.append(("seq", proj.weight.to(dtype), blk.to(dtype)))
        if proj.bias is not None:
            term = blk @ proj.bias.to(blk.dtype)
            bias = term if bias is None else bias + term
    if bias is None:
        bias = fw.new_zeros(D)
    return stages, bias.to(dtype), bn_folded


def _sources(p: HeadParts) -> list[Tensor]:
    ts = [] if p.opaque else [t for proj in p.stages for t in (proj.weight, proj.bias)]
    ts += [p.fuse.weight, p.fuse.bias]
    if isinstance(p.bn, nn.modules.batchnorm._BatchNorm):
        ts += [p.bn.weight, p.bn.bias, p.bn.running_mean, p.bn.running_var]
    return [t for t in ts if t is not None]


def _folded(p: HeadParts, features: Sequence[Tensor], cache: dict):
    sources = _sources(p)
    dtype = features[0].dtype
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return _fold(p, [f.shape[0] * f.shape[2] * f.shape[3] for f in features], dtype)
    if torch.compiler.is_compiling() or any(t.is_inference() for t in sources):
        with torch.no_grad():
            return _fold(p, None, dtype)
    key = (tuple((id(t), t._version) for t in sources), dtype, features[0].device,
           _bn_foldable(p.bn), torch.is_inference_mode_enabled())
    if cache.get("key") != key:
        with torch.no_grad():
            cache["value"] = _fold(p, None, dtype)
        cache["key"] = key
    return cache["value"]


def _pointwise(conv) -> bool:
    """A plain 1x1 conv that is exactly a per-pixel linear map."""
    return (plain(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1)


def folded_head(features: Sequence[Tensor], p: HeadParts, *, cache: dict,
                size: tuple[int, int] | None = None, backend: str | None = None) -> Tensor:
    """The head's output for stage features (B, C_i, H_i, W_i), stage 1 first, with
    ``linear_fuse`` folded; ``size``: output size (default stage 1's). ``cache``: a dict the
    caller keeps per head (folded weights in eval). Returns the classifier's logits (or the
    fused features when the head has no classifier) as an NCHW view of channels-last memory."""
    if len(features) != len(p.stages):
        raise ValueError(f"decode head: expected {len(p.stages)} stage features, got {len(features)}")
    for i, f in enumerate(features):
        if f.dim() != 4:
            raise ValueError(f"decode head: feature {i} must be NCHW (B, C, H, W), got shape "
                             f"{tuple(f.shape)}")
    B = features[-1].shape[0]
    H, W = size if size is not None else features[0].shape[-2:]
    stages, bias, bn_folded = _folded(p, features, cache)
    D = bias.shape[0]
    maps, hws = [], []
    for i, (f, st) in enumerate(zip(features, stages)):
        if p.opaque:
            # the original stage module (its BN: batch statistics, running-buffer updates)
            f = p.stages[i](f)
            if f.dim() != 4 or f.shape[1] != D:
                raise ValueError(f"decode head: stage module {i} must return (B, {D}, H, W), got "
                                 f"{tuple(f.shape)}")
        tokens = f.flatten(2).transpose(1, 2)               # (B, HW, C) view of NCHW
        # The whole folded bias rides on the last (smallest) stage's GEMM for free: bilinear
        # weights sum to one, so upsampling carries a constant through unchanged.
        b = bias if i == len(stages) - 1 else None
        if st[0] in ("w", "f"):
            y = linear(tokens, st[1], b, backend)
        else:
            y = linear(linear(tokens, st[1], None, backend), st[2], b, backend)
        maps.append(y)
        hws.append((f.shape[2], f.shape[3]))
    relu = bn_folded and plain(p.act, nn.ReLU)             # fused into the upsample-sum
    x = upsample_sum(maps, hws, (H, W), relu=relu, backend=backend)
    if (p.classifier is not None and _pointwise(p.classifier) and (p.bn is None or bn_folded)
            and (p.act is None or relu) and (p.dropout is None or not p.dropout.training)
            and usable(x, p.classifier.weight, p.classifier.bias, backend)):
        # the 1x1 classifier as one GEMM on the tokens: the stock conv2d on their channels-last
        # view took the slow im2col path in fp32 (2x slower on the 2-core AVX-512 CPU)
        K = p.classifier.weight.shape[0]
        y = linear(x, p.classifier.weight.view(K, D), p.classifier.bias, backend)
        return y.view(B, H, W, K).permute(0, 3, 1, 2)        # NCHW view, channels-last memory
    x = x.view(B, H, W, D).permute(0, 3, 1, 2)              # NCHW view, channels-last memory
    if p.bn is not None and not bn_folded:
        x = p.bn(x)         # the original module: batch statistics and running-buffer updates
    if p.act is not None and not relu:
        x = p.act(x)
    if p.dropout is not None:
        # channels-last like the original head's activations (its tokens -> NCHW views make
        # interpolate, concat and the 1x1 conv channels-last): nn.Dropout draws the same mask
        x = p.dropout(x)
    return x if p.classifier is None else p.classifier(x)
