"""The middle of the Mix-FFN: depthwise 3x3 conv + GELU on tokens, one ``ops.dwconv_gelu`` pass."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.dwconv_gelu import dwconv_gelu
from ._parts import hookless, plain

__all__ = ["dwconv_act", "dwconv_act_unfusable", "gelu_kind"]

# transformers' activation classes by name (the class objects differ between versions).
_HF_ERF = {"GELUActivation"}                     # ACT2FN["gelu"], ["gelu_python"]
_HF_TANH = {"NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"}


def gelu_kind(act) -> str | None:
    """The ``approximate`` argument of ``dwconv_gelu`` that reproduces ``act`` exactly, or None."""
    if act is F.gelu:
        return "none"
    if isinstance(act, nn.Module) and not hookless(act):
        return None
    if type(act) is nn.GELU:
        return act.approximate
    name = type(act).__name__
    if name in _HF_ERF:
        return "none"
    if name in _HF_TANH:
        return "tanh"
    return None


def _depthwise_3x3(conv) -> bool:
    return (plain(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and conv.groups == conv.in_channels == conv.out_channels)


def dwconv_act_unfusable(conv, act) -> str | None:
    """Why ``act(depthwise conv(tokens))`` cannot run as one ``ops.dwconv_gelu`` (None: it can)."""
    if not _depthwise_3x3(conv):
        return f"{conv!r} is not a plain depthwise 3x3 nn.Conv2d (stride 1, zero padding 1)"
    if gelu_kind(act) is None:
        return (f"activation {type(act).__name__} is not exact/tanh GELU (nn.GELU, F.gelu, "
                "transformers' GELUActivation/NewGELUActivation/GELUTanh/FastGELUActivation) or has hooks")
    return None


def dwconv_act(h: Tensor, H: int, W: int, conv: nn.Module, act, *,
               unfused: Callable[[Tensor], Tensor], backend: str | None = None) -> Tensor:
    """``act(depthwise3x3(h))`` on tokens h (B, H*W, C): one fused pass when ``conv`` is a plain
    depthwise 3x3 conv and ``act`` a GELU we reproduce exactly; otherwise ``unfused(h)`` (the
    codebase's own modules, called as written)."""
    if dwconv_act_unfusable(conv, act) is not None:
        return unfused(h)
    return dwconv_gelu(h, (H, W), conv.weight, conv.bias, gelu_kind(act), backend=backend)
