"""NVlabs' SegFormer (mmseg 0.x ``mix_transformer`` + ``SegFormerHead``), the seed document's
copy and ``segformer_fast.models``: recognised by attribute structure, not class names, because
every copy renames its classes (``Mlp``/``MLP``/``MixFFN``, ``PatchEmbed``/``OverlapPatchEmbed``).

Parts: patch embedding ``proj``/``norm`` -> (tokens, H, W); attention ``q``, packed ``kv`` (K
rows first), ``proj``, ``sr``/``norm``, ``attn_drop``/``proj_drop``, ``num_heads`` (``head`` in
the seed), ``scale``; Mix-FFN ``fc1``, ``dwconv.dwconv``, ``act`` (the seed calls ``F.gelu``),
``drop``, ``fc2``; head ``linear_c{k}.proj``, ``linear_fuse.conv/.bn/.activate``, ``dropout``,
``linear_pred``, concatenated deepest stage first.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..nn._parts import hookless
from ..nn.attention import spatial_reduction_attention
from ..nn.decode_head import HeadParts, folded_head, head_unfusable
from ..nn.mix_ffn import dwconv_act, dwconv_act_unfusable
from ..nn.patch_embed import conv_layernorm_tokens, conv_layernorm_unfusable
from ._match import Rule, backend_of, cache_of, checked, has, stock_forward

NAME = "nvlabs"


# ----------------------------------------------------------------------------- recognisers
def is_patch_embed(m):
    return has(m, "proj", "norm") and isinstance(m.proj, nn.Conv2d) and isinstance(m.norm, nn.LayerNorm)


def is_attention(m):
    return has(m, "q", "kv", "proj") and isinstance(m.q, nn.Module) and isinstance(m.kv, nn.Module)


def is_mix_ffn(m):
    return has(m, "fc1", "dwconv.dwconv", "fc2") and isinstance(m.dwconv.dwconv, nn.Conv2d)


def is_head(m):
    return has(m, "linear_c1", "linear_fuse", "linear_pred")


def matches(model: nn.Module) -> bool:
    return (any(is_attention(m) or is_head(m) for m in model.modules())
            or is_mix_ffn(model) or is_patch_embed(model))     # a bare part


# ----------------------------------------------------------------------------- patch embedding
def patch_embed_forward(self, x):
    tokens, (H, W) = conv_layernorm_tokens(x, self.proj, self.norm, backend=backend_of(self))
    return tokens, H, W


def patch_embed_unfusable(m):
    return conv_layernorm_unfusable(m.proj, m.norm)


# ----------------------------------------------------------------------------- attention
def split_kv(kv):
    """A packed K/V projection (K rows first) as a callable returning its column halves
    (strided views of one GEMM's output, never copied)."""
    def run(t):
        y = kv(t)
        c = y.shape[-1] // 2
        return y[..., :c], y[..., c:]
    return run


def attention_core(m, x, H, W):
    """The attention output projected by ``proj`` (before ``proj_drop``)."""
    sr = m.sr_ratio > 1
    out = spatial_reduction_attention(
        x, H, W, q=m.q, kv=split_kv(m.kv), num_heads=getattr(m, "num_heads", None) or m.head,
        scale=getattr(m, "scale", None), sr=m.sr if sr else None, norm=m.norm if sr else None,
        backend=backend_of(m))
    return m.proj(out)


def attention_forward(self, x, H, W):
    drop = getattr(self, "attn_drop", None)
    if self.training and drop is not None and drop.p > 0:     # probabilities must exist to drop
        return stock_forward(self, x, H, W)
    out = attention_core(self, x, H, W)
    drop = getattr(self, "proj_drop", None)
    return out if drop is None else drop(out)


def attention_unfusable(m):
    if (getattr(m, "num_heads", None) or getattr(m, "head", None)) is None:
        return "no number-of-heads attribute (num_heads or head)"
    return None


# ----------------------------------------------------------------------------- Mix-FFN
def mix_ffn_forward(self, x, H, W):
    act = getattr(self, "act", F.gelu)               # the seed's MLP calls F.gelu
    drop = getattr(self, "drop", None)
    h = self.fc1(x)
    conv = self.dwconv.dwconv if hookless(self.dwconv) else None
    h = dwconv_act(h, H, W, conv, act, backend=backend_of(self),
                   unfused=lambda t: act(self.dwconv(t, H, W)))
    if drop is not None:
        h = drop(h)
    h = self.fc2(h)
    return h if drop is None else drop(h)


def mix_ffn_unfusable(m):
    return dwconv_act_unfusable(m.dwconv.dwconv, getattr(m, "act", F.gelu))


# ----------------------------------------------------------------------------- decode head
def _stage_wrappers(head) -> list:
    out, i = [], 1
    while hasattr(head, f"linear_c{i}"):
        out.append(getattr(head, f"linear_c{i}"))
        i += 1
    return out


def head_parts(head) -> HeadParts:
    fuse = head.linear_fuse
    return HeadParts(stages=[w.proj for w in _stage_wrappers(head)], fuse=fuse.conv, bn=fuse.bn,
                     act=fuse.activate, dropout=getattr(head, "dropout", None),
                     classifier=head.linear_pred)


def head_unfusable_why(head):
    if not (all(hookless(w) for w in _stage_wrappers(head)) and hookless(head.linear_fuse)):
        return "hooks on a stage projection or on linear_fuse"
    if not has(head.linear_fuse, "conv", "bn", "activate"):
        return "linear_fuse is not a ConvModule (conv, bn, activate)"
    return head_unfusable(head_parts(head))


def head_forward(self, features, *args, **kwargs):
    return folded_head(list(features), head_parts(self), cache=cache_of(self), backend=backend_of(self))


RULES = [
    Rule("patch_embed", is_patch_embed, patch_embed_forward, patch_embed_unfusable),
    Rule("attention", is_attention, attention_forward, attention_unfusable),
    Rule("mix_ffn", is_mix_ffn, mix_ffn_forward, mix_ffn_unfusable),
    Rule("decode_head", is_head, checked(head_unfusable_why, head_forward), head_unfusable_why),
]
