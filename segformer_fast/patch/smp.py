"""segmentation_models_pytorch's MiT encoder (``encoder.patch_embed{k}``, ``block{k}[j].attn / .mlp``).

smp copies NVlabs' ``Attention`` and ``Mlp`` unchanged (tokens in, tokens out), so those are
replaced as for NVlabs. Its ``OverlapPatchEmbed`` has NVlabs' attribute names but returns the
normalised NCHW map: it gets ``FusedOverlapPatchEmbedNCHW``. Its ``SegformerDecoder`` is an
All-MLP head with other conventions (projections listed deepest first, output size = input // 4,
no classifier): ``FusedDecodeHead``'s "smp" layout folds it the same way.
smp cannot be imported beside a CPU torch (its encoders import timm, which needs a matching
torchvision), so tests/test_smp.py runs smp's own source files with a three-name stand-in for
``timm.layers`` (see tests/smp_source.py).
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
    (lambda m: hasattr(m, "mlp_stage") and hasattr(m, "fuse_stage"), _nn("FusedDecodeHead")),
]


def matches(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("segmentation_models_pytorch") for m in model.modules())


def targets(model: nn.Module):
    return walk(model, RULES)

