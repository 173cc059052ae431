"""Traffic/FLOP model of the CUDA C++ Mix-FFN core (csrc/cuda/dwconv_gelu.cu).

HBM (each tensor counted at its size; halo re-reads are served by L2): the forward reads x and the
weights and writes y. The backward is one fused kernel per tile (x with a 2-pixel halo and dy with a
1-pixel halo staged in shared memory, g = dy * gelu'(pre) kept there) that reads x and dy and writes
dx plus one fp32 partial row (10, C) per block; the reduction kernel reads the partials and writes
dw, db (fp32). Compared with the Triton pair (``analysis/dwconv_gelu.py``: g written by one kernel and
read back by the next), the backward moves 3 instead of 6 activation-sized tensors.

L2 traffic (reported apart): every block stages its halo, (8+2)^2/64 of the tile's input in the
forward, (8+4)^2/64 of x and (8+2)^2/64 of dy in the backward, each channel chunk padded to CB.

The tile constants mirror dwconv_gelu.cu (kept in step by hand: a change there must change them).
"""
from __future__ import annotations

import torch

from .roofline import Cost

__all__ = ["cuda_dwconv_gelu_cost", "TILE", "GROUPS", "MAX_ROWS"]

TILE = 8          # kTile: 8 x 8 output pixels per block
GROUPS = 8        # kGroups: channel vectors per block (CB = 8 V channels)
MAX_ROWS = 256    # kMaxRows: backward blocks along the tiles
_GELU_FLOPS, _GELU_GRAD_FLOPS = 10, 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cuda_dwconv_gelu_cost(B: int, H: int, W: int, C: int, dtype: torch.dtype = torch.float16,
                          backward: bool = False) -> dict:
    """HBM ``Cost`` (roofline on H100), L2 bytes, blocks, shared memory and partial rows of one CUDA
    dwconv_gelu call (forward, or forward + backward), for C divisible by the 16-byte vector."""
    s = torch.empty((), dtype=dtype).element_size()
    V = 16 // s
    CB = GROUPS * V
    E = B * H * W * C
    tiles = B * _cdiv(H, TILE) * _cdiv(W, TILE)
    chunks = _cdiv(C, CB)
    staged = tiles * chunks * CB * s                      # bytes of one pixel's chunk, per tile
    conv = 2 * 9 * E + E
    hbm = 2 * E * s + 10 * C * s
    l2 = staged * (TILE + 2) ** 2
    flops = conv + _GELU_FLOPS * E
    blocks = {"fwd": tiles * chunks}
    smem = {"fwd": (TILE + 2) ** 2 * CB * s + 10 * CB * 4}
    rows = None
    if backward:
        rows = max(1, min(tiles, MAX_ROWS))
        hbm += 3 * E * s + 10 * C * s + 2 * rows * 10 * C * 4 + 10 * C * 4
        l2 += staged * (TILE + 4) ** 2 + staged * (TILE + 2) ** 2
        # pre-activation on the 10x10 ring, g, dx (9 FMAs), dw (9 FMAs), db
        flops += (conv + _GELU_GRAD_FLOPS * E) * (TILE + 2) ** 2 // TILE ** 2 + 2 * 2 * 9 * E + E
        blocks.update(bwd=rows * chunks, reduce=_cdiv(10 * C, 256))
        smem["bwd"] = (TILE + 4) ** 2 * CB * s + ((TILE + 2) ** 2 + 10) * CB * 4
    tag = "fwd+bwd" if backward else "fwd"
    cost = Cost(f"cuda dwconv_gelu {tag} ({str(dtype)[6:]})", hbm, flops, tensor_core=False)
    return dict(hbm=cost, l2_bytes=l2, blocks=blocks, smem_bytes=smem, partial_rows=rows)
