"""Roofline arithmetic shared by every op's cost model.

GPU speed is argued, not claimed: each op module in ``segformer_fast/analysis`` returns the HBM
bytes and FLOPs of the reference op sequence and of the fused kernel, and this turns them into a
lower-bound time on an H100 SXM (3.35 TB/s HBM3, 989 TFLOP/s dense bf16/fp16 tensor cores,
67 TFLOP/s fp32 non-tensor). These are bounds, not measurements.
"""
from __future__ import annotations

from dataclasses import dataclass

H100_BYTES_PER_S = 3.35e12
H100_TENSOR_FLOPS = 989e12
H100_FP32_FLOPS = 67e12


@dataclass
class Cost:
    """Traffic and work of one op call, for one implementation."""

    name: str
    bytes: float
    flops: float
    tensor_core: bool = True   # whether the FLOPs run on tensor cores (GEMM-like) or CUDA cores

    def roofline_s(self) -> float:
        peak = H100_TENSOR_FLOPS if self.tensor_core else H100_FP32_FLOPS
        return max(self.bytes / H100_BYTES_PER_S, self.flops / peak)

    def __str__(self) -> str:
        return (f"{self.name}: {self.bytes / 1e6:.2f} MB, {self.flops / 1e9:.3f} GFLOP, "
                f"H100 roofline {self.roofline_s() * 1e6:.1f} us")


def compare(reference: Cost, fused: Cost) -> dict:
    """Summary of a reference-vs-fused pair: traffic ratio and roofline speed-up bound."""
    return {
        "reference": reference,
        "fused": fused,
        "bytes_ratio": reference.bytes / fused.bytes,
        "roofline_speedup": reference.roofline_s() / fused.roofline_s(),
    }
