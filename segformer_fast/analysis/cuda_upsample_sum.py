"""Traffic/FLOP model of the CUDA C++ decoder epilogue (csrc/cuda/upsample_sum.cu), eval epilogue
(bias, folded BatchNorm scale/shift, ReLU; the vectors fp32).

HBM (each tensor counted at its size; the 2x2 stencil re-reads of the small maps hit L1/L2): the
forward reads every map once and writes the (B, H*W, D) output once. The backward: the epilogue
kernel re-reads the maps and reads the incoming gradient, writes dz (fp32) and one fp32 (3, D)
partial row per block (read again by the reduction); the adjoint of each upsampled map runs along W
(dz -> (B, H, w, D), fp32 unless it is the last pass) then along H (-> (B, h, w, D) in the input
dtype); a map already at the output size gets dz cast to its dtype.

L2 (reported apart): every output pixel gathers 4 corner vectors per upsampled map and 1 per map
already at the output size.

The block shape mirrors upsample_sum.cu (kept in step by hand): 256 threads = tpx lanes along D
(V = 16 / element size channels each) x 256 / tpx pixel slots, 4 pixels per slot.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .roofline import Cost

__all__ = ["cuda_upsample_sum_cost"]

THREADS, REPS = 256, 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _lanes(n: int) -> int:
    t = 1
    while t < n and t < 32:
        t *= 2
    return t


def cuda_upsample_sum_cost(B: int, hws: Sequence[tuple[int, int]], D: int, dtype: torch.dtype = torch.float16,
                           backward: bool = False) -> dict:
    """HBM ``Cost`` (roofline on H100), L2 bytes, blocks and partial rows of one CUDA upsample_sum
    call with output size hws[0] (forward, or forward + backward), for D divisible by the vector."""
    s = torch.empty((), dtype=dtype).element_size()
    H, W = hws[0]
    HW = H * W
    up = [(h, w) for h, w in hws if (h, w) != (H, W)]
    at_size = len(hws) - len(up)
    tpx = _lanes(_cdiv(D, 16 // s))
    px_block = THREADS // tpx * REPS
    blocks = B * _cdiv(HW, px_block) * _cdiv(D, tpx * 16 // s)
    maps = B * sum(h * w for h, w in hws) * D * s
    out = B * HW * D
    hbm = maps + out * s + 3 * D * 4
    l2 = out * s * (at_size + 4 * len(up))
    flops = out * (len(hws) + 6 * len(up) + 4)            # sums, 2-D blends, affine + ReLU
    rows = None
    if backward:
        rows = B * _cdiv(HW, px_block)
        hbm += maps + out * s + 3 * D * 4 + out * 4 + 2 * rows * 3 * D * 4 + 3 * D * 4
        for h, w in up:
            if w != W:
                hbm += out * 4 + B * H * w * D * (4 if h != H else s)
            if h != H:
                hbm += B * H * w * D * 4 + B * h * w * D * s
        hbm += at_size * (out * 4 + out * s)
        flops += out * (len(hws) + 6 * len(up) + 10) + sum(2 * (out + B * H * w * D) * 3 for h, w in up)
    tag = "fwd+bwd" if backward else "fwd"
    cost = Cost(f"cuda upsample_sum {tag} ({str(dtype)[6:]})", hbm, flops, tensor_core=False)
    return dict(hbm=cost, l2_bytes=l2, blocks=blocks, partial_rows=rows)
