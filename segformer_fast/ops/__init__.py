"""Public fused ops: input checks, torch.library registration, autograd and backend dispatch.

Each op lives in its own module and is imported on first use.
"""
from .._lazy import lazy_getattr

__all__ = ["sra_attention", "dwconv_gelu", "conv_layernorm", "upsample_sum"]
__getattr__ = lazy_getattr(__name__, {name: f".{name}" for name in __all__})
