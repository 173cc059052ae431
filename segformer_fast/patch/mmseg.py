"""mmseg 1.x ``MixVisionTransformer`` (``backbone.layers[i] = [PatchEmbed, blocks, LayerNorm]``)
and ``SegformerHead``.

Recognised by structure, not class names (users subclass mmseg's modules). Parts:

- ``PatchEmbed``: ``projection``/``norm`` -> ``(tokens, (H, W))``; one built with adaptive
  ("corner") padding is refused (``adap_padding``);
- ``EfficientMultiheadAttention``: Q, K, V in one stock ``nn.MultiheadAttention`` (``attn``;
  ``in_proj_weight`` rows [q; k; v], so rows [:C] are the Q weight and rows [C:] exactly a packed
  K/V weight: zero-copy slices), ``sr``/``norm``, ``proj_drop``, ``dropout_layer``;
  ``forward(x, hw_shape, identity=None)`` returns ``identity + dropout_layer(proj_drop(out))``;
- ``MixFFN``: ``layers`` = [fc1, pe_conv, activate, drop, fc2, drop] with fc1/fc2 1x1 convs (run
  as linears on views of their weights); its dropouts see NCHW maps in the source's memory
  order (NCHW-contiguous at batch 1, channels-last otherwise); residual inside;
- ``SegformerHead``: per-stage ``convs`` (ConvModule: conv + BN + ReLU, non-linear: run as they
  are) and ``fusion_conv`` whose 1x1 conv moves before the upsampling (concat in stage order).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..nn._parts import hookless, plain, tokens_as_nchw, vouch
from ..nn.attention import spatial_reduction_attention
from ..nn.decode_head import HeadParts, folded_head, head_unfusable
from ..nn.mix_ffn import dwconv_act, dwconv_act_unfusable
from ..nn.patch_embed import conv_layernorm_tokens, conv_layernorm_unfusable
from ._match import Rule, backend_of, cache_of, checked, stock_forward

NAME = "mmseg"


# ----------------------------------------------------------------------------- recognisers
def is_patch_embed(m):
    return isinstance(getattr(m, "projection", None), nn.Conv2d) and isinstance(getattr(m, "norm", None), nn.LayerNorm)


def is_attention(m):
    return isinstance(getattr(m, "attn", None), nn.MultiheadAttention) and hasattr(m, "sr_ratio")


def is_mix_ffn(m):
    layers = getattr(m, "layers", None)
    return (isinstance(layers, nn.Sequential) and len(layers) == 6 and isinstance(layers[0], nn.Conv2d)
            and hasattr(m, "dropout_layer"))


def is_head(m):
    return isinstance(getattr(m, "convs", None), nn.ModuleList) and hasattr(m, "fusion_conv")


def _is_stage(stage) -> bool:
    if not (isinstance(stage, nn.ModuleList) and len(stage) == 3):
        return False
    embed, blocks, norm = stage
    return (is_patch_embed(embed) and isinstance(blocks, nn.ModuleList) and isinstance(norm, nn.LayerNorm)
            and len(blocks) > 0
            and all(is_attention(getattr(b, "attn", None)) and hasattr(getattr(b, "ffn", None), "layers")
                    for b in blocks))


def _is_backbone(m) -> bool:
    layers = getattr(m, "layers", None)
    return isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(_is_stage(s) for s in layers)


def _vouch_mmcv(model: nn.Module) -> None:
    # mmseg builds sr, fc1, pe_conv and fc2 with mmcv's Conv2d wrapper, which is nn.Conv2d's
    # forward on torch >= 1.5 (it only special-cases empty inputs on older torch)
    for m in model.modules():
        t = type(m)
        if (t.__module__, t.__name__) == ("mmcv.cnn.bricks.wrappers", "Conv2d") and isinstance(m, nn.Conv2d):
            vouch(t, nn.Conv2d)


def matches(model: nn.Module) -> bool:
    _vouch_mmcv(model)
    return any(_is_backbone(m) or is_attention(m) or is_mix_ffn(m) or is_head(m) or
               (m is model and is_patch_embed(m) and hasattr(m, "adap_padding")) for m in model.modules())


# ----------------------------------------------------------------------------- patch embedding
def patch_embed_forward(self, x):
    tokens, hw = conv_layernorm_tokens(x, self.projection, self.norm, backend=backend_of(self))
    return tokens, hw


def patch_embed_unfusable(m):
    if getattr(m, "adap_padding", None) is not None:
        return "PatchEmbed with adaptive padding (adap_padding): left to its stock forward"
    return conv_layernorm_unfusable(m.projection, m.norm)


# ----------------------------------------------------------------------------- attention
def attention_unfusable(m):
    mha = m.attn
    why = []
    if not plain(mha, nn.MultiheadAttention):
        why.append(f"attn is a {type(mha).__name__} (or has hooks), not a stock nn.MultiheadAttention")
    elif not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        why.append("separate q/k/v projection weights (kdim/vdim != embed_dim)")
    else:
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            why.append("add_bias_kv / add_zero_attn")
        # mmseg's wrapper (batch_first=True) hands the inner module (N, B, C): any other pairing
        # attends over a different axis than the tokens
        if mha.batch_first or not getattr(m, "batch_first", True):
            why.append(f"batch_first={getattr(m, 'batch_first', None)} around an inner "
                       f"batch_first={mha.batch_first}")
    if m.sr_ratio > 1 and not (isinstance(getattr(m, "sr", None), nn.Module)
                               and isinstance(getattr(m, "norm", None), nn.Module)):
        why.append(f"sr_ratio={m.sr_ratio} but no sr/norm modules")
    return f"{type(m).__name__} cannot be fused: {', '.join(why)}" if why else None


def attention_forward(self, x, hw_shape, identity=None):
    mha = self.attn
    if attention_unfusable(self) is not None or (self.training and mha.dropout > 0):
        return stock_forward(self, x, hw_shape, identity)
    C, w, b = mha.embed_dim, mha.in_proj_weight, mha.in_proj_bias
    sr = self.sr_ratio > 1

    def kv(t):                      # rows [C:3C] of [q; k; v]: one GEMM, its halves as views
        y = F.linear(t, w[C:], None if b is None else b[C:])
        return y[..., :C], y[..., C:]

    out = spatial_reduction_attention(
        x, hw_shape[0], hw_shape[1], q=lambda t: F.linear(t, w[:C], None if b is None else b[:C]),
        kv=kv, num_heads=mha.num_heads, sr=self.sr if sr else None, norm=self.norm if sr else None,
        backend=backend_of(self))
    o = mha.out_proj                # applied by weight inside nn.MultiheadAttention too
    drop = getattr(self, "proj_drop", None)
    if drop is not None and self.training and drop.p > 0:
        # the source's projection output is (N, B, C) memory seen as (B, N, C), and dropout masks
        # follow memory order: give a drawing dropout the same layout (one extra copy)
        out = F.linear(out.transpose(0, 1), o.weight, o.bias).transpose(0, 1)
    else:
        out = F.linear(out, o.weight, o.bias)
    if drop is not None:
        out = drop(out)
    return (x if identity is None else identity) + self.dropout_layer(out)


# ----------------------------------------------------------------------------- Mix-FFN
def _pointwise(conv, x, hw):
    """A 1x1 conv on tokens: a linear on a view of its weight when plain, else the module on the
    NCHW view."""
    if (plain(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.groups == 1):
        return F.linear(x, conv.weight.flatten(1), conv.bias)
    return conv(tokens_as_nchw(x, hw)).flatten(2).transpose(1, 2)


def _nchw_module(mod, x, hw):
    """``mod`` sees a (B, C, H, W) view of the tokens, as in the source (dropout masks alike)."""
    return mod(tokens_as_nchw(x, hw)).flatten(2).transpose(1, 2)


def _ffn_dropout(drop, x, hw):
    """The Mix-FFN's dropout on tokens, drawing the mask the source draws.

    A drawing dropout fills its mask in memory order, and the source's maps are the outputs of
    convs on ``nlc_to_nchw(x)`` = ``x.transpose(1, 2).reshape(B, C, H, W)``. At batch 1 (and more
    than one pixel) PyTorch does not read that view's strides as channels-last, so the source's
    convs return NCHW-contiguous maps and the mask is drawn in NCHW order; at batch > 1 they are
    channels-last, like our tokens. (Assumes fc1's weight is not itself channels-last memory,
    which would make the source's maps channels-last at batch 1 too.)"""
    if not (drop.training and getattr(drop, "p", 1.0) > 0) or x.shape[0] > 1 or x.shape[1] == 1:
        return _nchw_module(drop, x, hw)
    return drop(tokens_as_nchw(x, hw).contiguous()).flatten(2).transpose(1, 2)


def mix_ffn_forward(self, x, hw_shape, identity=None):
    if not hookless(self.layers):
        return stock_forward(self, x, hw_shape, identity)
    fc1, conv, act, drop, fc2, drop2 = self.layers
    hw = (hw_shape[0], hw_shape[1])
    h = _pointwise(fc1, x, hw)
    h = dwconv_act(h, hw[0], hw[1], conv, act, backend=backend_of(self),
                   unfused=lambda t: _nchw_module(lambda y: act(conv(y)), t, hw))
    h = _ffn_dropout(drop, h, hw)
    h = _ffn_dropout(drop2, _pointwise(fc2, h, hw), hw)
    return (x if identity is None else identity) + self.dropout_layer(h)


def mix_ffn_unfusable(m):
    return dwconv_act_unfusable(m.layers[1], m.layers[2])


# ----------------------------------------------------------------------------- decode head
def head_parts(head) -> HeadParts:
    fusion = head.fusion_conv
    return HeadParts(stages=list(head.convs), fuse=fusion.conv, bn=getattr(fusion, "bn", None),
                     act=getattr(fusion, "activate", None), dropout=getattr(head, "dropout", None),
                     classifier=head.conv_seg, reversed_concat=False, opaque=True)


def head_unfusable_why(head):
    fusion = head.fusion_conv
    order = tuple(getattr(fusion, "order", ("conv", "norm", "act")))
    if order != ("conv", "norm", "act"):
        return f"fusion_conv order {order} is not (conv, norm, act)"
    if getattr(head, "align_corners", False) or getattr(head, "interpolate_mode", "bilinear") != "bilinear":
        return "SegformerHead must resize bilinearly with align_corners=False"
    if getattr(head, "input_transform", "multiple_select") != "multiple_select":
        return "SegformerHead input_transform must be multiple_select"
    if not hookless(fusion):
        return "hooks on fusion_conv"
    return head_unfusable(head_parts(head))


def head_forward(self, inputs, *args, **kwargs):
    index = getattr(self, "in_index", None)     # mmseg's _transform_inputs ("multiple_select")
    features = [inputs[i] for i in index] if isinstance(index, (list, tuple)) else list(inputs)
    return folded_head(features, head_parts(self), cache=cache_of(self), backend=backend_of(self))


RULES = [
    Rule("patch_embed", is_patch_embed, patch_embed_forward, patch_embed_unfusable),
    Rule("attention", is_attention, attention_forward, attention_unfusable),
    Rule("mix_ffn", is_mix_ffn, mix_ffn_forward, mix_ffn_unfusable),
    Rule("decode_head", is_head, checked(head_unfusable_why, head_forward), head_unfusable_why),
]
