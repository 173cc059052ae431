"""How drop-in modules keep the replaced module's Parameters and state_dict keys."""
from __future__ import annotations

import torch.nn as nn


def adopt(fused: nn.Module, original: nn.Module) -> None:
    """Register ``original``'s children, direct Parameters and buffers on ``fused`` under the same
    names: the same objects (nothing copied), hence the same ``state_dict()`` keys and values."""
    for name, child in original.named_children():
        fused.add_module(name, child)
    for name, p in original._parameters.items():
        fused.register_parameter(name, p)
    for name, b in original._buffers.items():
        fused.register_buffer(name, b, persistent=name not in original._non_persistent_buffers_set)
