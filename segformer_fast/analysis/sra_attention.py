"""Traffic/FLOP model of spatial-reduction attention: reference op sequence vs the fused kernels.

Reference (``segformer_fast.reference.sra_attention`` as PyTorch runs it): head-transpose copies
of q, k, v (matmul of a transposed view copies it), S = q k^T written, ``* scale`` (read + write
S), softmax (read S, write P), P v (read P), output transpose copy. Its backward (autograd) writes
dP, reads P twice, writes dS, reads it twice, and copies every gradient between layouts.

Fused: q, k, v read once, O and the fp32 LSE written; K/V of one head are re-read by every query
tile but stay in L2 (M·d·elt is 16-128 KB per head at SegFormer shapes), so they are counted once.
Backward: the dQ kernel reads q, dO, K, V, LSE and writes dQ and delta (fp32); the dK/dV kernel
reads q, dO, LSE, delta and writes fp32 partial sums over ``splits`` query chunks (reduced by one
extra pass) — the N x M matrix never reaches HBM in either direction.
These are lower-bound models (each tensor counted at its size, perfect caching of the small
operands), not measurements.
"""
from __future__ import annotations

import torch

from .roofline import Cost, compare

__all__ = ["sra_attention_cost", "segformer_attention_shapes"]


def segformer_attention_shapes(height: int, width: int, variant: str = "b0") -> list[dict]:
    """(N, M, C, num_heads) of the four stages' attention for an input image height x width."""
    dims = [32, 64, 160, 256] if variant == "b0" else [64, 128, 320, 512]
    heads = [1, 2, 5, 8]
    srs = [8, 4, 2, 1]
    out = []
    h, w = -(-height // 4), -(-width // 4)              # stage-1 tokens: k7 s4 p3
    for i in range(4):
        if i:
            h, w = -(-h // 2), -(-w // 2)               # k3 s2 p1
        m = (h // srs[i]) * (w // srs[i])
        out.append(dict(N=h * w, M=m, C=dims[i], num_heads=heads[i]))
    return out


def sra_attention_cost(B: int, N: int, M: int, C: int, num_heads: int,
                       dtype: torch.dtype = torch.float16, backward: bool = False,
                       splits: int | None = None) -> dict:
    """``compare(reference, fused)`` for one call (forward, or forward + backward)."""
    e = torch.empty((), dtype=dtype).element_size()
    h = num_heads
    q, kv, S = B * N * C, B * M * C, B * h * N * M      # elements of q (and O), of k (or v), of S
    rows = B * h * N
    mnk = B * N * M * C                                 # = sum over heads of N*M*d

    # ---- forward
    ref_bytes = (2 * (q + 2 * kv) * e                   # head-transpose copies of q, k, v
                 + (q + kv) * e + S * e                 # S = q k^T
                 + 2 * S * e                            # * scale
                 + 2 * S * e                            # softmax
                 + S * e + kv * e + q * e               # P v
                 + 2 * q * e)                           # output transpose copy
    ref_flops = 4 * mnk + 5 * S
    fused_bytes = (q + 2 * kv) * e + q * e + rows * 4
    fused_flops = 4 * mnk + 5 * S
    if backward:
        if splits is None:
            from ..kernels.triton.sra_attention import dkdv_splits, launch_config
            cfg = launch_config("dkdv", C // h, dtype)
            splits = dkdv_splits(N, M, B * h, cfg["BLOCK_N"], cfg["BLOCK_M"])
        ref_bytes += (2 * q * e                         # dO transpose copy
                      + S * e + (q + kv) * e            # dP = dO v^T
                      + S * e + q * e + kv * e          # dV = P^T dO
                      + 3 * S * e                       # softmax backward: read P, dP, write dS
                      + 2 * S * e                       # scale backward
                      + S * e + kv * e + q * e          # dQ = dS k
                      + S * e + q * e + kv * e          # dK = dS^T q
                      + 2 * (q + 2 * kv) * e)           # gradient transpose copies
        ref_flops += 8 * mnk + 4 * S
        fused_bytes += ((2 * q + 2 * kv) * e + rows * 4 + q * e + rows * 4     # dQ kernel
                        + 2 * q * e + 2 * rows * 4                             # dK/dV kernel reads
                        + 2 * kv * 4 * splits                                  # fp32 partials
                        + 2 * kv * 4 * splits                                  # reduction reads
                        + 2 * kv * e)                                          # dK, dV
        # dQ kernel: two sweeps (delta, then dQ): 5 GEMMs; dK/dV kernel: 4 GEMMs (2*mnk each)
        fused_flops += 18 * mnk + 8 * S
    tag = "fwd+bwd" if backward else "fwd"
    return compare(Cost(f"reference sra_attention {tag}", ref_bytes, ref_flops),
                   Cost(f"fused sra_attention {tag}", fused_bytes, fused_flops))
