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


# Subclasses a codebase adapter vouches for: their forward is exactly the stock class's on the
# inputs we give them (smp's LayerNorm only adds an NCHW branch that tokens never take; mmcv's
# Conv2d wrapper only special-cases empty inputs on torch < 1.5).
_VOUCHED: dict[type, set[type]] = {}


def vouch(cls: type, as_: type) -> None:
    """Declare ``cls`` an exact ``as_`` (called by the adapter that knows the codebase)."""
    if not issubclass(cls, as_):
        raise TypeError(f"vouch: {cls.__name__} is not a subclass of {as_.__name__}")
    _VOUCHED.setdefault(as_, set()).add(cls)


def plain(m, cls: type) -> bool:
    """``m`` is exactly a ``cls`` (no subclass but a vouched one, no hooks): its weights are its
    whole forward."""
    return (type(m) is cls or type(m) in _VOUCHED.get(cls, ())) and hookless(m)


def tokens_as_nchw(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, H*W, C) tokens as a (B, C, H, W) view in channels-last memory (no copy).

    ``x.transpose(1, 2).reshape`` would give batch-1 inputs a batch stride PyTorch does not
    recognise as channels-last, sending convolutions to the NCHW kernels plus copies."""
    B, _, C = x.shape
    return x.unflatten(1, (hw[0], hw[1])).permute(0, 3, 1, 2)
