"""Op-level timing of the Mix-FFN core (depthwise 3x3 + bias + GELU on tokens) at SegFormer's
real hidden sizes.

Implementations: ``fused`` (our op with the device's backend: ``triton`` on CUDA, ``torch`` on
CPU), ``reference`` (segformer_fast.reference), ``stock_cl`` (the strongest stock alternative:
mkldnn/cuDNN channels-last depthwise conv + GELU), ``transpose`` (the NCHW path with explicit
layout copies, as the codebases' DWConv runs on devices without channels-last kernels).
CPU: 512² B0 only (the Triton path needs a GPU at real shapes); 1024² and B2 are CUDA-only.
"""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from segformer_fast import reference
from segformer_fast.ops.dwconv_gelu import dwconv_gelu

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="CUDA-only case")

# (label, B, H, W, C): Mix-FFN hidden = 4 * embed dim at stage resolution (image / 4, 8, 16, 32).
CPU_SHAPES = [
    ("b0_512_s1", 1, 128, 128, 128),
    ("b0_512_s2", 1, 64, 64, 256),
    ("b0_512_s4", 1, 16, 16, 1024),
]
GPU_SHAPES = [
    ("b0_1024_s1", 1, 256, 256, 128),
    ("b2_512_s1", 2, 128, 128, 256),
    ("b2_512_s3", 2, 32, 32, 1280),
    ("b2_1024_s1", 2, 256, 256, 256),
    ("b2_1024_s4", 2, 32, 32, 2048),
]


def stock_cl(x, hw, w, b, approximate="none"):
    B, N, C = x.shape
    xin = x.transpose(1, 2).reshape(B, C, *hw).contiguous(memory_format=torch.channels_last)
    y = F.conv2d(xin, w, b, padding=1, groups=C)
    return F.gelu(y.flatten(2).transpose(1, 2), approximate=approximate)


def transpose_path(x, hw, w, b, approximate="none"):
    B, N, C = x.shape
    y = F.conv2d(x.transpose(1, 2).contiguous().view(B, C, *hw), w, b, padding=1, groups=C)
    return F.gelu(y.flatten(2).transpose(1, 2).contiguous(), approximate=approximate)


IMPLS = {
    "fused": lambda *a: dwconv_gelu(*a, backend="triton" if a[0].is_cuda else "torch"),
    "reference": reference.dwconv_gelu,
    "stock_cl": stock_cl,
    "transpose": transpose_path,
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, impl, shape, device, dtype, backward):
    label, B, H, W, C = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, H * W, C, generator=g).to(device, dtype).requires_grad_(backward)
    w = (torch.randn(C, 1, 3, 3, generator=g) / 3).to(device, dtype).requires_grad_(backward)
    b = (torch.randn(C, generator=g) * 0.2).to(device, dtype).requires_grad_(backward)
    dy = torch.randn(B, H * W, C, generator=g).to(device, dtype)
    fn = IMPLS[impl]

    def body():
        if backward:
            y = fn(x, (H, W), w, b)
            torch.autograd.backward(y, dy)
            x.grad = w.grad = b.grad = None
        else:
            with torch.no_grad():
                fn(x, (H, W), w, b)
        _sync(device)

    benchmark.extra_info.update(
        op="dwconv_gelu", impl=impl, shape=label, B=B, H=H, W=W, C=C, dtype=str(dtype),
        pass_="fwd+bwd" if backward else "fwd", device=torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or platform.machine(), torch=torch.__version__,
        threads=torch.get_num_threads())
    benchmark(body)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=[s[0] for s in CPU_SHAPES])
def test_cpu_fwd(benchmark, impl, shape):
    _run(benchmark, impl, shape, torch.device("cpu"), torch.float32, backward=False)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", CPU_SHAPES[:2], ids=[s[0] for s in CPU_SHAPES[:2]])
def test_cpu_fwd_bwd(benchmark, impl, shape):
    _run(benchmark, impl, shape, torch.device("cpu"), torch.float32, backward=True)


@gpu
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", CPU_SHAPES + GPU_SHAPES, ids=[s[0] for s in CPU_SHAPES + GPU_SHAPES])
def test_cuda(benchmark, impl, shape, backward):
    _run(benchmark, impl, shape, torch.device("cuda"), torch.float16, backward)
