"""NVlabs' SegFormer (mmseg 0.x ``mix_transformer`` + ``SegFormerHead``), the seed document's
copy and ``segformer_fast.models``: recognised by attribute structure, not class names, because
every copy renames its classes (``Mlp``/``MLP``/``MixFFN``, ``PatchEmbed``/``OverlapPatchEmbed``).
"""
from __future__ import annotations

import torch.nn as nn

from ._match import has, walk
from .hf import _nn

NAME = "nvlabs"


def _patch_embed(m):
    return has(m, "proj", "norm") and isinstance(m.proj, nn.Conv2d) and isinstance(m.norm, nn.LayerNorm)


def _attention(m):
    return has(m, "q", "kv", "proj") and isinstance(m.q, nn.Linear) and isinstance(m.kv, nn.Linear)


def _mix_ffn(m):
    return has(m, "fc1", "dwconv.dwconv", "fc2") and isinstance(m.dwconv.dwconv, nn.Conv2d)


def _head(m):
    return has(m, "linear_c1", "linear_fuse", "linear_pred")


RULES = [
    (_patch_embed, _nn("FusedOverlapPatchEmbed")),
    (_attention, _nn("FusedEfficientAttention")),
    (_mix_ffn, _nn("FusedMixFFN")),
    (_head, _nn("FusedDecodeHead")),
]


def matches(model: nn.Module) -> bool:
    return any(_attention(m) or _head(m) for m in model.modules())


def targets(model: nn.Module):
    return walk(model, RULES)
