"""segmentation_models_pytorch's MiT encoder and SegformerDecoder.

smp copies NVlabs' ``Attention`` and ``Mlp`` unchanged (tokens in, tokens out): they get NVlabs'
fused forwards. Its ``OverlapPatchEmbed`` has NVlabs' attribute names but returns the normalised
NCHW map: its fused forward returns a (B, C, H', W') view of the tokens (channels-last memory, no
copy), which the next block's ``flatten(2).transpose(1, 2)`` turns back into tokens, again without
a copy. Its ``LayerNorm`` subclasses ``nn.LayerNorm`` and only adds an NCHW branch, so on tokens
it is nn.LayerNorm exactly. Its ``SegformerDecoder`` is an All-MLP head with ``mlp_stage[i].linear``
listed deepest stage first, ``fuse_stage`` = (conv, norm, ReLU), no classifier, and the output
size input // 4 (not stage 1's size when the input is not a multiple of 4).

smp cannot be imported beside a CPU torch (its encoders import timm, which needs a matching
torchvision), so tests run smp's own source files with a stand-in for ``timm.layers``.
"""
from __future__ import annotations

import torch.nn as nn

from ..nn._parts import hookless, vouch
from ..nn.decode_head import HeadParts, folded_head, head_unfusable
from ..nn.patch_embed import conv_layernorm_tokens
from . import nvlabs
from ._match import Rule, backend_of, cache_of, checked

NAME = "segmentation_models_pytorch"


def _smp_class(m) -> bool:
    return type(m).__module__.startswith("segmentation_models_pytorch")


def matches(model: nn.Module) -> bool:
    for m in model.modules():
        if _smp_class(m) and type(m).__name__ == "LayerNorm" and isinstance(m, nn.LayerNorm):
            vouch(type(m), nn.LayerNorm)
    return any(_smp_class(m) for m in model.modules())


def patch_embed_forward(self, x):
    tokens, (H, W) = conv_layernorm_tokens(x, self.proj, self.norm, backend=backend_of(self))
    return tokens.view(tokens.shape[0], H, W, tokens.shape[2]).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- decoder
def is_decoder(m):
    return hasattr(m, "mlp_stage") and hasattr(m, "fuse_stage")


def decoder_parts(dec) -> HeadParts:
    conv, norm, act = dec.fuse_stage
    return HeadParts(stages=[mlp.linear for mlp in reversed(dec.mlp_stage)], fuse=conv, bn=norm, act=act)


def decoder_unfusable(dec):
    if not (all(hookless(m) for m in dec.mlp_stage) and hookless(dec.fuse_stage)):
        return "hooks on an mlp_stage module or on fuse_stage"
    if len(dec.fuse_stage) != 3:
        return f"fuse_stage must be (conv, norm, activation), got {len(dec.fuse_stage)} modules"
    return head_unfusable(decoder_parts(dec))


def decoder_forward(self, features):
    size = (features[0].shape[2] // 4, features[0].shape[3] // 4)
    stages = features[2:] if features[1].shape[1] == 0 else features[1:]   # smp's placeholder
    return folded_head(list(stages), decoder_parts(self), cache=cache_of(self), size=size,
                       backend=backend_of(self))


RULES = [
    Rule("patch_embed", nvlabs.is_patch_embed, patch_embed_forward, nvlabs.patch_embed_unfusable),
    Rule("attention", nvlabs.is_attention, nvlabs.attention_forward, nvlabs.attention_unfusable),
    Rule("mix_ffn", nvlabs.is_mix_ffn, nvlabs.mix_ffn_forward, nvlabs.mix_ffn_unfusable),
    Rule("decode_head", is_decoder, checked(decoder_unfusable, decoder_forward), decoder_unfusable),
]
