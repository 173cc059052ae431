"""Traffic/FLOP model of the Mix-FFN core: depthwise 3x3 conv + bias + GELU on (B, H*W, C) tokens.

Reference (the sequence every SegFormer codebase runs on a GPU in eager PyTorch, DESIGN.md):
tokens -> NCHW layout copy -> depthwise conv -> NCHW -> tokens layout copy -> GELU. Each pass
reads and writes the whole (B, N, C) activation, the largest tensor of the block; the two layout
copies are a parameter (``layout_copies``; 0 models a backend that runs the conv channels-last
on a view, like our ``torch`` backend).

Fused (kernels/triton/dwconv_gelu.py): forward reads x once (neighbour re-reads hit L1/L2) and
writes y once. Backward: ``_bwd_act_kernel`` reads x and dy and writes g = dy*gelu'(pre) (pre
recomputed, never stored), ``_bwd_conv_kernel`` reads g and x and writes dx plus fp32 partial
rows of dw/db, ``_reduce_kernel`` reads the partials.
"""
from __future__ import annotations

from .roofline import Cost, compare

_GELU_FLOPS = 10          # erf/exp polynomial + the 0.5*x*(1+.) arithmetic, per element
_GELU_GRAD_FLOPS = 16


def dwconv_gelu_cost(B: int, H: int, W: int, C: int, dtype_bytes: int = 2, backward: bool = False,
                     layout_copies: int = 2) -> dict:
    """``compare(reference, fused)`` for one call at (B, H*W, C); forward, or forward+backward
    when ``backward``. Weights (C*10 values) are counted; they are negligible."""
    from ..kernels.triton.dwconv_gelu import bwd_partial_rows, launch_config

    E = B * H * W * C
    s = dtype_bytes
    wbytes = 10 * C * s
    conv_flops = 2 * 9 * E + E             # 9 multiply-adds + bias per output
    # forward
    ref_bytes = (2 * layout_copies) * E * s + 2 * E * s + wbytes + 2 * E * s
    fused_bytes = 2 * E * s + wbytes
    ref_flops = fused_flops = conv_flops + _GELU_FLOPS * E
    if backward:
        # reference autograd: GELU backward reads dy and the saved pre-activation, writes g;
        # each layout copy's backward is another copy; conv backward: dx (read g, write dx) and
        # dw/db (read g and x again).
        ref_bytes += 3 * E * s + (2 * layout_copies) * E * s + 2 * E * s + 2 * E * s + wbytes
        ref_flops += _GELU_GRAD_FLOPS * E + 2 * 2 * 9 * E + E
        # fused: act kernel (x, dy -> g), conv kernel (g, x -> dx + partials), reduce.
        G = bwd_partial_rows(B, H * W, C)
        block_c = launch_config("bwd_conv", C)["BLOCK_C"]
        partial_bytes = G * -(-C // block_c) * 10 * block_c * 4
        fused_bytes += 3 * E * s + 3 * E * s + 2 * partial_bytes + 2 * wbytes
        # the backward recomputes the conv for gelu'(pre)
        fused_flops += conv_flops + _GELU_GRAD_FLOPS * E + 2 * 2 * 9 * E + E
    tag = "fwd+bwd" if backward else "fwd"
    return compare(Cost(f"reference dwconv->gelu {tag} ({layout_copies} layout copies)", ref_bytes,
                        ref_flops, tensor_core=False),
                   Cost(f"fused dwconv_gelu {tag}", fused_bytes, fused_flops, tensor_core=False))
