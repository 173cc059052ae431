"""Public fused ops: input checks, torch.library registration, autograd and backend dispatch.

Importing these is cheap: Triton kernel modules are imported only when a Triton launch happens.
The functions are bound eagerly because importing a submodule binds it on the package under the
same name, which would shadow a lazily resolved function.
"""
from .conv_layernorm import conv_layernorm
from .dwconv_gelu import dwconv_gelu
from .sra_attention import sra_attention
from .upsample_sum import upsample_sum
from .resize_argmax import resize_argmax

__all__ = ["sra_attention", "dwconv_gelu", "conv_layernorm", "upsample_sum", "resize_argmax"]
