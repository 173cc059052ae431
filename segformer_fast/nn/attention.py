"""Spatial-reduction attention up to (not including) the output projection.

    q = q_proj(x);  x_kv = LayerNorm(sr_conv(x)) as tokens (one ``ops.conv_layernorm``, no
    transpose);  k, v = kv_proj(x_kv);  out = ``ops.sra_attention`` (no N x M matrix)

The projections are callables given by the codebase adapter: the user's modules themselves
(so PEFT LoRA adapters, quantised linears and hooks take part) or zero-copy views of a packed
weight (mmseg's ``in_proj_weight`` rows). K and V come from the reduced tokens, which are few
(H*W/64 in stage 1), so computing them as two GEMMs costs what one packed GEMM would.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn
from torch import Tensor

from ..ops.sra_attention import sra_attention
from .patch_embed import conv_layernorm_tokens

__all__ = ["spatial_reduction_attention"]

Proj = Callable[[Tensor], Tensor]


def spatial_reduction_attention(x: Tensor, H: int, W: int, *, q: Proj,
                                kv: Callable[[Tensor], tuple[Tensor, Tensor]], num_heads: int,
                                scale: float | None = None, sr: nn.Module | None = None,
                                norm: nn.Module | None = None,
                                backend: str | None = None) -> Tensor:
    """Multi-head attention of the tokens ``x`` (B, H*W, C) over their spatially reduced copy.

    q: tokens -> queries (B, N, C); kv: reduced tokens -> (keys, values), each (B, M, C) (column
    halves of one packed GEMM are fine: only the channel stride must be 1); sr/norm: the
    reduction conv (k = s = sr_ratio) and its LayerNorm, None when sr_ratio == 1. Returns the
    attention output (B, N, C) before the output projection, heads concatenated."""
    queries = q(x)
    x_kv = x if sr is None else conv_layernorm_tokens(x, sr, norm, (H, W), backend=backend)[0]
    keys, values = kv(x_kv)
    return sra_attention(queries, keys, values, num_heads, scale, backend=backend)
