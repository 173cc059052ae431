"""Hugging Face transformers SegFormer, both layouts.

>= 5.9: ``segformer.stages[i].patch_embeddings / blocks[j].attention / .mlp``,
``decode_head.linear_projections``. The model records stage outputs with forward hooks on
``SegformerStage``, so only leaf modules below the stages are replaced (never a stage); the
attention replacement returns ``(out, None)`` like the original.
<= 5.8: ``segformer.encoder.patch_embeddings[i] / block[i][j].attention (.self/.output) / .mlp``,
``decode_head.linear_c``.
"""
from __future__ import annotations

import torch.nn as nn

from ._match import class_named, walk

NAME = "huggingface"


def _nn(name: str):
    def load():
        from .. import nn as fused

        return getattr(fused, name)

    return load


RULES = [
    (class_named("SegformerOverlapPatchEmbeddings"), _nn("FusedOverlapPatchEmbed")),
    (class_named("SegformerAttention"), _nn("FusedEfficientAttention")),
    (class_named("SegformerMixMLP", "SegformerMixFFN"), _nn("FusedMixFFN")),
    (class_named("SegformerDecodeHead"), _nn("FusedDecodeHead")),
]


def matches(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("transformers.models.segformer") for m in model.modules())


def targets(model: nn.Module):
    return walk(model, RULES)
