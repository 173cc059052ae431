"""Traffic/FLOP model of the CUDA C++ conv + LayerNorm (csrc/cuda/conv_layernorm.cu).

HBM (lower bound, each tensor counted at its size): the forward reads x, the (Cout, K) weight
(written once by the Python-side permute of the (Cout, Cin, kh, kw) weight: read + write + read)
and the (Cout,) vectors, and writes the tokens; the conv output never leaves the chip. Backward:
the dz kernel reads x, the weight and dy, writes dz and one fp32 partial row (3, Cout) per block;
the reduction reads the partial rows and writes (3, Cout); d(input) and d(weight) are
``aten.convolution_backward`` (reads dz twice, x and the weight once, writes dx and dw).

L2 traffic is reported apart: every block streams the whole (Cout, K) weight through shared memory
and gathers its BM x K im2col window (overlapping windows re-read x from L2); the dz kernel re-reads
dy once more (its channel pass).

FLOPs: ``useful`` counts the real GEMM (2 per multiply-add) and the LayerNorm; ``executed`` what the
tiles compute (Cout padded to NB = 8 columns per warp, K to whole BK slices, tokens to whole blocks).
fp16/bf16 run on tensor cores (mma.sync), fp32 on CUDA cores (IEEE FMA).

The tile rule mirrors ``ClCfg``/``cl_smem``/``rows_per_block`` in conv_layernorm.cu (kept in step by
hand: a change there must change ``tiles``).
"""
from __future__ import annotations

import torch

from .roofline import Cost

__all__ = ["cuda_conv_layernorm_cost", "tiles"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tiles(cout: int, dtype: torch.dtype = torch.float16) -> dict:
    """Block tile of the kernels for ``cout`` channels: tokens per block BM, padded channels NB,
    reduction slice BK and dynamic shared memory in bytes (always <= 48 KB: no opt-in)."""
    if not 1 <= cout <= 512:
        raise ValueError(f"the CUDA conv_layernorm takes 1 <= Cout <= 512, got {cout}")
    f32 = dtype == torch.float32
    e = 4 if f32 else 2
    rw = 4 if cout <= 64 else 1
    bm, cw = 16 * rw, 4 // rw
    nb = cw * 8 * _cdiv(cout, 8 * cw)
    bk = 16 if f32 else 32
    ld = bk + (4 if f32 else 8)
    smem = bm * (8 + 16) + max((bm + nb) * ld * e, bm * (nb + 4) * 4)
    return dict(BM=bm, NB=nb, BK=bk, smem_bytes=smem)


def cuda_conv_layernorm_cost(B: int, Cin: int, H: int, W: int, Cout: int, k: int, stride: int, padding: int,
                             dtype: torch.dtype = torch.float16, backward: bool = False) -> dict:
    """HBM ``Cost`` (roofline on H100), L2 bytes, useful/executed FLOPs, blocks and shared memory of
    one CUDA conv_layernorm call (forward, or forward + backward)."""
    e = torch.empty((), dtype=dtype).element_size()
    t = tiles(Cout, dtype)
    Ho = (H + 2 * padding - k) // stride + 1
    Wo = (W + 2 * padding - k) // stride + 1
    nout, K = Ho * Wo, Cin * k * k
    blocks = _cdiv(nout, t["BM"]) * B
    x, y, w, vec = B * Cin * H * W * e, B * nout * Cout * e, Cout * K * e, 3 * Cout * e
    gemm = 2 * B * nout * Cout * K
    ln = 8 * B * nout * Cout
    executed = 2 * blocks * t["BM"] * t["NB"] * _cdiv(K, t["BK"]) * t["BK"] + ln

    hbm = x + 3 * w + vec + y
    l2 = blocks * (Cout * K * e + t["BM"] * K * e)
    useful = gemm + ln
    kernel_blocks = {"fwd": blocks}
    if backward:
        part = blocks * 3 * Cout * 4
        hbm += (x + 3 * w + vec + y + y + part) + (part + 3 * Cout * 4) + (2 * y + x + w + x + w)
        l2 += blocks * (Cout * K * e + t["BM"] * K * e) + y
        useful += 3 * gemm + 2 * ln            # recomputed conv, d(input), d(weight); LN backward
        executed += executed + 2 * gemm + ln   # the dz kernel recomputes the forward's tiles
        kernel_blocks.update(dz=blocks, reduce=_cdiv(3 * Cout, 32))
    tag = "fwd+bwd" if backward else "fwd"
    cost = Cost(f"cuda conv_layernorm {tag} ({str(dtype)[6:]})", hbm, executed,
                tensor_core=dtype != torch.float32)
    return dict(hbm=cost, l2_bytes=l2, useful_flops=useful, executed_flops=executed,
                padding_overhead=executed / useful - 1.0, blocks=kernel_blocks, smem_bytes=t["smem_bytes"])
