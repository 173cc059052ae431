"""mmseg 1.x ``MixVisionTransformer`` (``backbone.layers[i] = [PatchEmbed, blocks, LayerNorm]``).

Recognised by structure, not class names (users subclass mmseg's modules): a ``layers`` list of
stages, each ``[patch embed with projection/norm, list of blocks with attn (holding an
nn.MultiheadAttention as ``attn``) and ffn (holding ``layers``), norm]``. Replaced:

- ``layers[i][0]`` ``PatchEmbed`` -> ``FusedOverlapPatchEmbed`` (mmseg layout, ``(tokens, (H, W))``);
  one built with adaptive ("corner") padding is left alone and reported;
- ``attn`` ``EfficientMultiheadAttention`` -> ``FusedEfficientAttention`` (mmseg layout: Q and
  packed K/V as slices of ``in_proj_weight``, residual and ``dropout_layer`` inside);
- ``ffn`` ``MixFFN`` -> ``FusedMixFFN`` (mmseg layout: 1x1-conv weights viewed as linear weights);
- ``decode_head`` ``SegformerHead`` -> ``FusedDecodeHead`` (mmseg layout): the per-stage
  ``ConvModule`` (conv + BN + ReLU) is non-linear and runs as-is, but ``fusion_conv``'s 1x1 conv
  moves before the upsampling (one D x D GEMM per stage at its own resolution instead of 4D -> D
  at H/4); the head's other methods (``loss``, ``predict``, ``cls_seg``) stay reachable.

Tested against stand-in modules written from mmseg 1.x's source semantics (same attribute names,
same forward arithmetic and RNG order), not against mmseg itself: mmseg needs mmcv's compiled
ops, which this project's CI cannot install.
"""
from __future__ import annotations

import torch.nn as nn

from ._match import walk
from .hf import _nn

NAME = "mmseg"


def _patch_embed(m):
    return (isinstance(getattr(m, "projection", None), nn.Conv2d)
            and isinstance(getattr(m, "norm", None), nn.LayerNorm))


def _adaptive_padding(m):
    return getattr(m, "adap_padding", None) is not None


def _attention(m):
    return isinstance(getattr(m, "attn", None), nn.MultiheadAttention) and hasattr(m, "sr_ratio")


def _mix_ffn(m):
    layers = getattr(m, "layers", None)
    return (isinstance(layers, nn.Sequential) and len(layers) == 6 and isinstance(layers[0], nn.Conv2d)
            and hasattr(m, "dropout_layer"))


def _head(m):
    return isinstance(getattr(m, "convs", None), nn.ModuleList) and hasattr(m, "fusion_conv")


RULES = [
    (lambda m: _patch_embed(m) and not _adaptive_padding(m), _nn("FusedOverlapPatchEmbed")),
    (_attention, _nn("FusedEfficientAttention")),
    (_mix_ffn, _nn("FusedMixFFN")),
    (_head, _nn("FusedDecodeHead")),
]


def _is_stage(stage) -> bool:
    if not (isinstance(stage, nn.ModuleList) and len(stage) == 3):
        return False
    embed, blocks, norm = stage
    return (_patch_embed(embed) and isinstance(blocks, nn.ModuleList) and isinstance(norm, nn.LayerNorm)
            and len(blocks) > 0
            and all(_attention(getattr(b, "attn", None)) and hasattr(getattr(b, "ffn", None), "layers")
                    for b in blocks))


def _is_backbone(m) -> bool:
    layers = getattr(m, "layers", None)
    return isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(_is_stage(s) for s in layers)


def matches(model: nn.Module) -> bool:
    return any(_is_backbone(m) for m in model.modules())


def targets(model: nn.Module):
    return walk(model, RULES)


def skipped(model: nn.Module):
    """Modules mmseg users might expect to be fused, with the reason they are not."""
    for path, m in model.named_modules():
        if _patch_embed(m) and _adaptive_padding(m):
            yield path, "PatchEmbed with adaptive padding: left to stock PyTorch"
