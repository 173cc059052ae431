"""segmentation_models_pytorch's MiT encoder (``encoder.patch_embed{k}``, ``block{k}[j].attn / .mlp``).

smp copies NVlabs' ``Attention`` and ``Mlp`` unchanged (tokens in, tokens out), so those are
replaced as for NVlabs. Its ``OverlapPatchEmbed`` has NVlabs' attribute names but returns the
normalised NCHW map: it gets ``FusedOverlapPatchEmbedNCHW``. Its Segformer decoder is a different
head (reversed MLPs sized from the input, ``Conv2dReLU`` fuse, a separate segmentation head): it
is left alone and reported as skipped.
Only stand-ins are tested (tests/test_smp.py): smp's encoders import timm, which needs a
torchvision built for the installed torch (see README).
"""
from __future__ import annotations

import torch.nn as nn

from ._match import walk
from .nvlabs import _attention, _mix_ffn, _patch_embed
from .hf import _nn

NAME = "segmentation_models_pytorch"

RULES = [
    (_patch_embed, _nn("FusedOverlapPatchEmbedNCHW")),
    (_attention, _nn("FusedEfficientAttention")),
    (_mix_ffn, _nn("FusedMixFFN")),
]


def matches(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("segmentation_models_pytorch") for m in model.modules())


def targets(model: nn.Module):
    return walk(model, RULES)


def skipped(model: nn.Module):
    """Modules smp users might expect to be fused, with the reason they are not."""
    for path, m in model.named_modules():
        name = type(m).__name__
        if name == "SegformerDecoder":
            yield path, "smp's Segformer decoder differs from the All-MLP head: not fused yet"
