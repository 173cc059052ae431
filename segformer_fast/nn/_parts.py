"""When a fused forward may read a part's weights instead of calling it.

A fused kernel replaces several modules' arithmetic with one pass over their weights. That is
only exact when each of those modules *is* its arithmetic: a stock ``nn.Linear``/``nn.Conv2d``/
``nn.LayerNorm`` (not a subclass: PEFT LoRA layers, quantised linears and parametrised modules
override ``forward`` or ``weight``) with no hooks that could change its inputs or outputs.
Everything else is called as the module it is.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor


def hookless(m: nn.Module) -> bool:
    """No forward (pre-)hooks on ``m``: calling ``m`` is its forward.

    Global module hooks (``register_module_forward_hook``) are not counted: tools register them
    to observe every module (FlopCounterMode, profilers), and a fused pass has no per-module
    boundaries to observe."""
    return not (m._forward_hooks or m._forward_pre_hooks)


def plain(m, cls: type) -> bool:
    """``m`` is exactly a ``cls`` (no subclass, no hooks): its weights are its whole forward."""
    return type(m) is cls and hookless(m)


# LayerNorm subclasses a codebase adapter vouches for: F.layer_norm over the last dim of tokens,
# like nn.LayerNorm (smp's LayerNorm only adds an NCHW branch that tokens never take).
_EXACT_LAYERNORMS: set[type] = {nn.LayerNorm}


def vouch_layernorm(cls: type) -> None:
    """Declare ``cls`` an exact nn.LayerNorm on tokens (called by the adapter that knows it)."""
    _EXACT_LAYERNORMS.add(cls)


def plain_layernorm(m) -> bool:
    return type(m) in _EXACT_LAYERNORMS and hookless(m)


def tokens_as_nchw(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, H*W, C) tokens as a (B, C, H, W) view in channels-last memory (no copy).

    ``x.transpose(1, 2).reshape`` would give batch-1 inputs a batch stride PyTorch does not
    recognise as channels-last, sending convolutions to the NCHW kernels plus copies."""
    B, _, C = x.shape
    return x.unflatten(1, (hw[0], hw[1])).permute(0, 3, 1, 2)
