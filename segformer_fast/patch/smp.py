"""segmentation_models_pytorch's MiT encoder (``encoder.block{k}[j].attn / .mlp``).

smp copies NVlabs' ``Attention`` and ``Mlp`` unchanged (tokens in, tokens out), so those are
replaced. Its ``OverlapPatchEmbed`` returns an NCHW map instead of tokens and its Segformer
decoder is a different head (reversed MLPs sized from the input, ``Conv2dReLU`` fuse, a separate
segmentation head): both are left alone and reported as skipped.
Not exercised in CI: smp needs a torchvision built for the installed torch (see README).
"""
from __future__ import annotations

import torch.nn as nn

from ._match import walk
from .nvlabs import _attention, _mix_ffn
from .hf import _nn

NAME = "segmentation_models_pytorch"

RULES = [
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
        if name == "OverlapPatchEmbed":
            yield path, "smp's patch embedding returns NCHW maps, not tokens: left to stock PyTorch"
        elif name == "SegformerDecoder":
            yield path, "smp's Segformer decoder differs from the All-MLP head: not fused yet"
