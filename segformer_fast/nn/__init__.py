"""Drop-in modules: same parameters and state_dict keys as the modules they replace."""
from .._lazy import lazy_getattr

_TABLE = {
    "FusedOverlapPatchEmbed": ".patch_embed",
    "FusedOverlapPatchEmbedNCHW": ".patch_embed",
    "FusedEfficientAttention": ".attention",
    "FusedMixFFN": ".mix_ffn",
    "FusedDecodeHead": ".decode_head",
}
__all__ = list(_TABLE)
__getattr__ = lazy_getattr(__name__, _TABLE)
