"""Hugging Face transformers SegFormer, both layouts.

>= 5.9: ``segformer.stages[i].patch_embeddings / blocks[j].attention (q_proj, k_proj, v_proj,
o_proj, sequence_reduction) / .mlp (fc1, dwconv.dwconv, activation_fn, fc2)``,
``decode_head.linear_projections[i].proj``. Attention weights are recorded by forward hooks on
the ``SegformerAttention`` instances (``output_attentions=True``): since the instances stay, the
hooks stay, and when attentions are asked for the attention runs its stock forward (the
probabilities must exist to be returned); otherwise it returns ``(out, None)`` as the SDPA path.
<= 5.8: ``segformer.encoder.patch_embeddings[i] / block[i][j].attention (.self: query, key,
value, sr, layer_norm; .output: dense, dropout) / .mlp (dense1, dwconv.dwconv,
intermediate_act_fn, dense2)``, ``decode_head.linear_c[i].proj``; attention returns ``(out,)``
or, with ``output_attentions=True``, the stock ``(out, probs)``.
"""
from __future__ import annotations

import math

import torch.nn as nn

from ..nn.attention import spatial_reduction_attention
from ..nn.decode_head import HeadParts, folded_head, head_unfusable
from ..nn.mix_ffn import dwconv_act, dwconv_act_unfusable
from ..nn.patch_embed import conv_layernorm_tokens, conv_layernorm_unfusable
from ._match import Rule, backend_of, cache_of, checked, class_named, stock_forward
from ..nn._parts import hookless
from ..nn._onednn import linear_module

NAME = "huggingface"


def matches(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("transformers.models.segformer") for m in model.modules())


# ----------------------------------------------------------------------------- patch embedding
def patch_embed_forward(self, pixel_values):
    tokens, (H, W) = conv_layernorm_tokens(pixel_values, self.proj, self.layer_norm,
                                           backend=backend_of(self))
    return tokens, H, W


def _patch_embed_unfusable(m):
    return conv_layernorm_unfusable(m.proj, m.layer_norm)


# ----------------------------------------------------------------------------- attention
def _attentions_requested(kwargs) -> bool:
    if kwargs.get("output_attentions"):
        return True
    try:    # transformers >= 5.9 collects attentions through hooks while this is active
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def attention_forward(self, hidden_states, height, width, attention_mask=None, **kwargs):
    """transformers >= 5.9 ``SegformerAttention`` -> (out, None)."""
    if (attention_mask is not None or _attentions_requested(kwargs)
            or (self.training and self.attention_dropout > 0)):
        return stock_forward(self, hidden_states, height, width, attention_mask, **kwargs)
    bk = backend_of(self)
    sr = getattr(self, "sequence_reduction", None) if self.sequence_reduction_ratio > 1 else None
    # plain nn.Linear through oneDNN on CPU inference; other modules (LoRA, hooks) are called
    q, k, v, o = (linear_module(m, bk) for m in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))
    kv = lambda t: (k(t), v(t))     # noqa: E731
    if sr is not None and not hookless(sr):             # hooks on the reduction wrapper: call it
        x_kv = sr(hidden_states, height, width)
        out = spatial_reduction_attention(hidden_states, height, width, q=q, kv=lambda t: kv(x_kv),
                                          num_heads=self.num_attention_heads, scale=self.scaling,
                                          backend=bk)
    else:
        out = spatial_reduction_attention(
            hidden_states, height, width, q=q, kv=kv, num_heads=self.num_attention_heads,
            scale=self.scaling, sr=None if sr is None else sr.sequence_reduction,
            norm=None if sr is None else sr.layer_norm, backend=bk)
    return o(out), None


def legacy_attention_forward(self, hidden_states, height, width, output_attentions=False):
    """transformers <= 5.8 ``SegformerAttention`` (children ``self`` and ``output``) -> (out,)."""
    s = self.self
    if output_attentions or (self.training and s.dropout.p > 0) or not (hookless(s) and hookless(self.output)):
        return stock_forward(self, hidden_states, height, width, output_attentions)
    sr = s.sr_ratio > 1
    out = spatial_reduction_attention(
        hidden_states, height, width, q=s.query, kv=lambda t: (s.key(t), s.value(t)),
        num_heads=s.num_attention_heads, scale=s.attention_head_size ** -0.5,
        sr=s.sr if sr else None, norm=s.layer_norm if sr else None, backend=backend_of(self))
    return (self.output.dropout(self.output.dense(out)),)


# ----------------------------------------------------------------------------- Mix-FFN
def mix_ffn_forward(self, hidden_states, height, width):
    """``SegformerMixMLP`` (>= 5.9: fc1/activation_fn/fc2) and ``SegformerMixFFN`` (<= 5.8:
    dense1/intermediate_act_fn/dense2): fc1 -> dwconv + act (fused) -> dropout -> fc2 -> dropout."""
    legacy = hasattr(self, "dense1")
    fc1, fc2 = (self.dense1, self.dense2) if legacy else (self.fc1, self.fc2)
    fc1, fc2 = linear_module(fc1, backend_of(self)), linear_module(fc2, backend_of(self))
    act = self.intermediate_act_fn if legacy else self.activation_fn
    h = fc1(hidden_states)
    conv = self.dwconv.dwconv if hookless(self.dwconv) else None     # hooks on the wrapper: call it
    h = dwconv_act(h, height, width, conv, act, backend=backend_of(self),
                   unfused=lambda t: act(self.dwconv(t, height, width)))
    h = self.dropout(h)
    return self.dropout(fc2(h))


def _mix_ffn_unfusable(m):
    legacy = hasattr(m, "dense1")
    return dwconv_act_unfusable(m.dwconv.dwconv, m.intermediate_act_fn if legacy else m.activation_fn)


# ----------------------------------------------------------------------------- decode head
def _projections(head) -> list:
    return list(head.linear_projections if hasattr(head, "linear_projections") else head.linear_c)


def _head_parts(head) -> HeadParts:
    return HeadParts(stages=[mlp.proj for mlp in _projections(head)], fuse=head.linear_fuse,
                     bn=head.batch_norm, act=head.activation, dropout=head.dropout,
                     classifier=head.classifier)


def _head_unfusable(head):
    if not all(hookless(mlp) for mlp in _projections(head)):
        return "a stage projection wrapper (SegformerMLP) has hooks"
    return head_unfusable(_head_parts(head))


def _prepare(head, states) -> list:
    # HF's ``reshape_last_stage=False`` branch, as HF writes it (the side of the square comes
    # from the *last* dimension), so the outputs stay identical to the stock head
    config = getattr(head, "config", None)
    if config is None or getattr(config, "reshape_last_stage", True) is not False:
        return list(states)
    batch = states[-1].shape[0]
    out = []
    for s in states:
        if s.ndim == 3:
            side = int(math.sqrt(s.shape[-1]))
            s = s.reshape(batch, side, side, -1).permute(0, 3, 1, 2).contiguous()
        out.append(s)
    return out


def decode_head_forward(self, encoder_hidden_states, **kwargs):
    return folded_head(_prepare(self, encoder_hidden_states), _head_parts(self), cache=cache_of(self),
                       backend=backend_of(self))


RULES = [
    Rule("patch_embed", class_named("SegformerOverlapPatchEmbeddings"), patch_embed_forward,
         _patch_embed_unfusable),
    Rule("attention", lambda m: class_named("SegformerAttention")(m) and hasattr(m, "q_proj"),
         attention_forward),
    Rule("attention", lambda m: class_named("SegformerAttention")(m) and hasattr(m, "self"),
         legacy_attention_forward),
    Rule("mix_ffn", class_named("SegformerMixMLP", "SegformerMixFFN"), mix_ffn_forward, _mix_ffn_unfusable),
    Rule("decode_head", class_named("SegformerDecodeHead"), checked(_head_unfusable, decode_head_forward),
         _head_unfusable),
]
