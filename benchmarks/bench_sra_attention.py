"""Spatial-reduction attention at SegFormer's real shapes: op vs reference vs stock SDPA backends.

impls: "op" = segformer_fast.ops.sra_attention with the automatic backend (the Triton kernels on
CUDA, the SDPA composition of the ``torch`` backend on CPU); "reference" = the materialised
N x M softmax; "sdpa_<backend>" = ``F.scaled_dot_product_attention`` on the usual
transposed-head views, pinned to one backend with ``torch.nn.attention.sdpa_kernel``
(CPU: math, flash (the CPU flash kernel), default; CUDA adds efficient and cudnn).
CPU: 512^2 B0 stage 1 and 2 only; 1024^2 and 1024x2048 (and B2's head dim 64) are CUDA-only.
Peak memory: CUDA records ``torch.cuda.max_memory_allocated`` minus the inputs; CPU records no
measurement, only the analytic size of the N x M intermediates the implementation materialises
(``extra_info["nxm_bytes_estimate"]``).
"""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from segformer_fast import reference as R
from segformer_fast.ops.sra_attention import sra_attention

# (name, N, M, C, heads): N = (H/4)(W/4) / 4^(stage-1), M = (H/32)(W/32)
SHAPES = [
    ("b0_s1_512", 128 * 128, 16 * 16, 32, 1),
    ("b0_s2_512", 64 * 64, 16 * 16, 64, 2),
    ("b2_s1_512", 128 * 128, 16 * 16, 64, 1),
    ("b2_s2_1024", 128 * 128, 32 * 32, 128, 2),
    ("b2_s1_1024", 256 * 256, 32 * 32, 64, 1),
    ("b2_s1_1024x2048", 256 * 512, 32 * 64, 64, 1),
    ("b2_s3_1024x2048", 64 * 128, 32 * 64, 320, 5),
]
CPU_OK = {"b0_s1_512", "b0_s2_512"}

SDPA = {
    "sdpa_math": SDPBackend.MATH,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_default": None,
}
CUDA_ONLY_IMPLS = {"sdpa_efficient", "sdpa_cudnn"}


def _sdpa(q, k, v, heads, backend):
    B, N, C = q.shape
    d = C // heads
    qh, kh, vh = (t.unflatten(2, (heads, d)).transpose(1, 2) for t in (q, k, v))
    if backend is None:
        out = F.scaled_dot_product_attention(qh, kh, vh)
    else:
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(B, N, C)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["op", "reference"] + list(SDPA))
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_sra_attention(benchmark, shape, impl, mode):
    name, N, M, C, heads = shape
    cuda = torch.cuda.is_available()
    if not cuda and name not in CPU_OK:
        pytest.skip("CUDA-only shape (CPU: 512^2 B0 only)")
    if not cuda and impl in CUDA_ONLY_IMPLS:
        pytest.skip(f"{impl} is a CUDA SDPA backend")
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    grad = mode == "fwd_bwd"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, N, C, generator=g).to(device, dtype).requires_grad_(grad)
    kv = torch.randn(1, M, 2 * C, generator=g).to(device, dtype).requires_grad_(grad)
    k, v = kv[..., :C], kv[..., C:]          # as the attention module produces them

    if impl == "op":
        fn = lambda: sra_attention(q, k, v, heads)
    elif impl == "reference":
        fn = lambda: R.sra_attention(q, k, v, heads)
    else:
        fn = lambda: _sdpa(q, k, v, heads, SDPA[impl])
    gout = torch.randn(1, N, C, generator=g).to(device, dtype)

    def run():
        y = fn()
        if grad:
            y.backward(gout)
        if cuda:
            torch.cuda.synchronize()
        return y

    try:
        run()                                 # warm-up; also rejects unsupported SDPA backends
    except RuntimeError as e:
        pytest.skip(f"{impl} unavailable here: {str(e).splitlines()[0][:120]}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_bytes_above_inputs"] = torch.cuda.max_memory_allocated() - base
    e = torch.empty((), dtype=dtype).element_size()
    materialises = impl in ("reference", "sdpa_math")
    benchmark.extra_info["nxm_bytes_estimate"] = (3 if materialises else 0) * heads * N * M * e * (2 if grad else 1)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                                torch=torch.__version__, dtype=str(dtype), N=N, M=M, C=C, heads=heads,
                                mode=mode, impl=impl)
    benchmark(run)
