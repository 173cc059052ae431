"""Fused forwards taking explicit parts (modules, weights, eps, heads, activation kind).

The codebase adapters in ``segformer_fast.patch`` name the parts of the user's modules and call
these; each reads weights only where a part is exactly its weights (``plain``), and calls the
part as a module otherwise (LoRA, quantised layers, hooks).
"""
from .._lazy import lazy_getattr

_TABLE = {
    "conv_layernorm_tokens": ".patch_embed",
    "conv_layernorm_unfusable": ".patch_embed",
    "spatial_reduction_attention": ".attention",
    "dwconv_act": ".mix_ffn",
    "dwconv_act_unfusable": ".mix_ffn",
    "gelu_kind": ".mix_ffn",
    "HeadParts": ".decode_head",
    "folded_head": ".decode_head",
    "head_unfusable": ".decode_head",
    "hookless": "._parts",
    "plain": "._parts",
    "tokens_as_nchw": "._parts",
}
__all__ = list(_TABLE)
__getattr__ = lazy_getattr(__name__, _TABLE)
