"""Conv + LayerNorm with tokens out: the overlapping patch embedding and the sequence reduction."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..ops.conv_layernorm import conv_layernorm
from ._parts import plain, tokens_as_nchw

__all__ = ["conv_layernorm_tokens", "conv_layernorm_unfusable"]


def conv_layernorm_unfusable(conv, norm) -> str | None:
    """Why ``norm(conv(x))`` cannot run as one ``ops.conv_layernorm`` (None: it can)."""
    if not plain(conv, nn.Conv2d):
        return f"the conv is a {type(conv).__name__} (or has hooks), not a plain nn.Conv2d"
    if not plain(norm, nn.LayerNorm):
        return f"the norm is a {type(norm).__name__} (or has hooks), not a plain nn.LayerNorm"
    why = []
    if conv.groups != 1:
        why.append(f"groups={conv.groups}")
    if tuple(conv.dilation) != (1, 1):
        why.append(f"dilation={tuple(conv.dilation)}")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        why.append(f"padding={conv.padding!r} padding_mode={conv.padding_mode!r}")
    if tuple(norm.normalized_shape) != (conv.out_channels,):
        why.append(f"LayerNorm over {tuple(norm.normalized_shape)}, expected ({conv.out_channels},)")
    return ", ".join(why) or None


def conv_layernorm_tokens(x: Tensor, conv: nn.Module, norm: nn.Module, hw=None, *,
                          backend: str | None = None) -> tuple[Tensor, tuple[int, int]]:
    """``norm`` over channels of ``conv(x)``, as tokens: (B, H'*W', Cout) and (H', W').

    x: an image (B, Cin, H, W), or tokens (B, H*W, Cin) with ``hw=(H, W)`` (read in place, no
    transpose). Plain ``nn.Conv2d`` + ``nn.LayerNorm`` run as one ``ops.conv_layernorm``; any
    other pair (LoRA, hooks, an unusual conv) is called module by module, exactly as written."""
    if conv_layernorm_unfusable(conv, norm) is None:
        return conv_layernorm(x, conv.weight, conv.bias, norm.weight, norm.bias, tuple(conv.stride),
                              tuple(conv.padding), norm.eps, hw, backend=backend)
    y = conv(x if hw is None else tokens_as_nchw(x, hw))
    H, W = y.shape[-2:]
    return norm(y.flatten(2).transpose(1, 2)), (H, W)
