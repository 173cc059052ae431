"""Traffic/FLOP model of the CUDA C++ spatial-reduction attention (csrc/cuda/sra_attention.cu).

HBM (lower bound, each tensor counted at its size, K/V of a head read from HBM once and re-read
from L2 by every block): forward reads q, k, v and writes O and the fp32 LSE. Backward: the dQ
kernel reads q, dO, K, V, LSE and writes dQ and delta; the dK/dV kernel reads K, V, q, dO, LSE,
delta and writes fp32 partial sums over ``splits`` query chunks; the reduction kernel reads the
partials and writes dK, dV. The N x M matrix never reaches memory.

L2 traffic is reported apart: every 64-query block streams the head's whole K and V through shared
memory (twice in the dQ kernel: delta sweep, then dQ sweep), and every 64-key dK/dV block streams
its query chunk's q, dO, LSE and delta.

FLOPs: ``useful`` counts the real shapes; ``executed`` what the tiles compute (the head dim padded
to 32/64/128, keys and queries padded to whole tiles). fp16/bf16 run on tensor cores (mma.sync),
fp32 on CUDA cores (IEEE FMA), which sets the roofline peak.

The tile sizes mirror ``Cfg`` in sra_attention.cu and the split rule mirrors
``sra_attention_dkdv_splits`` there (kept in step by hand; a change there must change ``_tiles``).
"""
from __future__ import annotations

import torch

from .roofline import Cost

__all__ = ["cuda_sra_attention_cost"]

_ROWS = 64          # rows per block: 4 warps x 16 (queries in fwd/dQ, keys in dK/dV)
_SMS = 132          # H100 SXM: the dK/dV split targets about one block per SM


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _padded_dim(d: int) -> int:
    return 32 if d <= 32 else 64 if d <= 64 else 128


def _tiles(dtype: torch.dtype, d: int) -> dict:
    """Key tile of fwd and dQ, query tile of dK/dV, smem row stride and bytes per launch (Cfg)."""
    D = _padded_dim(d)
    f32 = dtype == torch.float32
    e = 4 if f32 else 2
    ld = D + (4 if f32 else 8)
    fwd_keys = 32 if f32 and D > 64 else 64
    dq_keys = 16 if f32 and D > 64 else 64
    dkdv_q = (16 if f32 else 32) if D > 64 else 64
    scratch = (lambda cols: 4 * 16 * (cols + 4) * 4) if f32 else (lambda cols: 0)
    return dict(D=D, fwd_keys=fwd_keys, dq_keys=dq_keys, dkdv_queries=dkdv_q,
                smem_fwd=(_ROWS + 2 * fwd_keys) * ld * e + scratch(fwd_keys),
                smem_dq=(2 * _ROWS + 2 * dq_keys) * ld * e + scratch(dq_keys),
                smem_dkdv=(2 * _ROWS + 2 * dkdv_q) * ld * e + 2 * dkdv_q * 4 + scratch(dkdv_q))


def _splits(B: int, N: int, M: int, H: int, bn: int) -> int:
    n_tiles = _cdiv(N, bn)
    want = _cdiv(_SMS, _cdiv(M, _ROWS) * B * H)
    splits = max(1, min(want, n_tiles // 2))
    return _cdiv(n_tiles, _cdiv(n_tiles, splits))


def cuda_sra_attention_cost(B: int, N: int, M: int, C: int, num_heads: int,
                            dtype: torch.dtype = torch.float16, backward: bool = False) -> dict:
    """HBM ``Cost`` (roofline on H100), L2 bytes, useful/executed FLOPs, blocks, shared memory and
    dK/dV splits of one CUDA sra_attention call (forward, or forward + backward)."""
    e = torch.empty((), dtype=dtype).element_size()
    H, d = num_heads, C // num_heads
    t = _tiles(dtype, d)
    D = t["D"]
    q, kv, rows = B * N * C, B * M * C, B * H * N
    mnk = B * N * M * C
    n_pad = _cdiv(N, _ROWS) * _ROWS

    hbm = (q + 2 * kv) * e + q * e + rows * 4
    l2 = _cdiv(N, _ROWS) * B * H * 2 * M * d * e                  # K/V streamed per query block
    useful = 4 * mnk
    executed = 4 * B * H * n_pad * (_cdiv(M, t["fwd_keys"]) * t["fwd_keys"]) * D
    blocks = {"fwd": _cdiv(N, _ROWS) * B * H}
    smem = {"fwd": t["smem_fwd"]}
    splits = None
    if backward:
        bn = t["dkdv_queries"]
        splits = _splits(B, N, M, H, bn)
        m_dq = _cdiv(M, t["dq_keys"]) * t["dq_keys"]
        m_kv = _cdiv(M, _ROWS) * _ROWS
        hbm += ((2 * q + 2 * kv) * e + rows * 4 + q * e + rows * 4      # dQ kernel
                + (2 * kv + 2 * q) * e + 2 * rows * 4                    # dK/dV kernel reads
                + 2 * kv * 4 * splits                                    # fp32 partials written
                + 2 * kv * 4 * splits + 2 * kv * e)                      # reduction
        l2 += (2 * _cdiv(N, _ROWS) * B * H * 2 * M * d * e            # dQ: two sweeps over K/V
               + _cdiv(M, _ROWS) * B * H * (2 * N * d * e + 2 * N * 4))  # dK/dV: q, dO, LSE, delta
        useful += 18 * mnk            # dQ kernel: S, dP twice + dS K (5 GEMMs); dK/dV: 4 GEMMs
        executed += 2 * B * H * D * (5 * n_pad * m_dq + 4 * m_kv * _cdiv(N, bn) * bn)
        blocks.update(dq=blocks["fwd"], dkdv=_cdiv(M, _ROWS) * B * H * splits,
                      reduce=2 * min(_cdiv(kv, 256), 4096))
        smem.update(dq=t["smem_dq"], dkdv=t["smem_dkdv"])
    tag = "fwd+bwd" if backward else "fwd"
    cost = Cost(f"cuda sra_attention {tag} ({str(dtype)[6:]})", hbm, executed,
                tensor_core=dtype != torch.float32)
    return dict(hbm=cost, l2_bytes=l2, useful_flops=useful, executed_flops=executed,
                padding_overhead=executed / useful - 1.0, blocks=blocks, smem_bytes=smem, splits=splits)
