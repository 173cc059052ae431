"""Traffic/FLOP model of conv + LayerNorm: the reference sequence vs the fused Triton kernels.

Counted in HBM bytes (each tensor read once per kernel that touches it: the conv's overlapping
windows are assumed to hit L2, which holds for these small images/activations per tile row) and
FLOPs (2 per multiply-add). ``e`` is the element size of the input dtype.

Reference forward (segformer_fast.reference / every SegFormer codebase):
  token input only: tokens -> NCHW transpose copy          read |x| + write |x|
  conv2d                                                    read |x| + |w|, write |z| (NCHW)
  flatten/transpose -> layer_norm makes it contiguous       read |z| + write |z|
  layer_norm                                                read |z|, write |y| (+ mean/rstd)
Fused forward: read |x| + |w|, write |y|.

Reference backward (autograd of the above): LayerNorm backward reads dy, z (saved), writes dz;
the transpose's backward copies dz back to NCHW (read + write); conv backward reads dz twice
(data and weight grads), x once, writes dx, dw; token input: dx transposed back (read + write).
Fused backward: the dz kernel reads x, w, dy (recomputes z on chip), writes dz; the conv
backward reads dz twice (channels-last, no copy) and x once, writes dx and dw.
"""
from __future__ import annotations

import torch

from .roofline import Cost, compare


def conv_layernorm_cost(B: int, Cin: int, H: int, W: int, Cout: int, k: int, stride: int, padding: int,
                        dtype: torch.dtype = torch.float16, tokens: bool = False,
                        backward: bool = False) -> dict:
    """``compare(reference, fused)`` for one call (forward, or forward + backward if ``backward``)."""
    e = torch.empty((), dtype=dtype).element_size()
    Ho = (H + 2 * padding - k) // stride + 1
    Wo = (W + 2 * padding - k) // stride + 1
    x = B * Cin * H * W * e
    z = B * Cout * Ho * Wo * e
    w = Cout * Cin * k * k * e + 3 * Cout * e
    stats = B * Ho * Wo * 2 * 4
    gemm = 2.0 * B * Ho * Wo * Cout * Cin * k * k
    ln = 8.0 * B * Ho * Wo * Cout

    ref_bytes = (2 * x if tokens else 0) + (x + w + z) + 2 * z + (z + z + stats)
    fused_bytes = x + w + z
    ref_flops = fused_flops = gemm + ln
    if backward:
        ref_bytes += (z + z + stats + z) + 2 * z + (2 * z + x + x + w) + (2 * x if tokens else 0)
        fused_bytes += (x + w + z + z) + (2 * z + x + x + w)
        ref_flops += 2 * gemm + 2 * ln
        fused_flops += 3 * gemm + 3 * ln           # the recomputed conv tile
    return compare(Cost("reference conv + transpose + layer_norm", ref_bytes, ref_flops),
                   Cost("fused conv_layernorm", fused_bytes, fused_flops))
