"""The CUDA C++ spatial-reduction attention (csrc/cuda/sra_attention.cu).

Without a GPU: ``sra_attention(..., backend="cuda")`` runs the kernels in the CUDA emulation
(SEGFORMER_FAST_CUDA_EMULATE=1, CPU tensors)
against the fp64 reference on the Triton twin's odd shapes, in two block orders (shuffled blocks
and warps, two worker threads); every .cu under csrc/cuda compiles with nvcc for sm_80 and sm_90a
with 0 spills; the GPU binding passes g++ -fsyntax-only. With a GPU: the nvcc build on CUDA tensors.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from segformer_fast import backends, reference
from segformer_fast.kernels import cuda as K
from segformer_fast.ops.sra_attention import sra_attention
from segformer_fast.testing import check_op

from cuda_testing import ARCHS, CSRC, CU_FILES, NVCC, assert_no_spills, emu, needs_nvcc, order  # noqa: F401


def cuda_attention(q, k, v, heads, scale=None):
    return sra_attention(q, k, v, heads, scale, backend="cuda")


# (heads, head_dim, N, M, batch, q/k magnitude): the Triton twin's shapes
CASES = [
    pytest.param(5, 32, 221, 7, 2, 1.0, id="h5d32-N221-M7-B2"),
    pytest.param(2, 64, 221, 1, 2, 1.0, id="h2d64-N221-M1-B2"),
    pytest.param(1, 64, 300, 37, 2, 1.0, id="h1d64-N300-M37-B2"),
    pytest.param(8, 32, 23, 23, 1, 6.0, id="h8d32-N23-M23-sharp"),
    pytest.param(1, 32, 97, 131, 1, 1.0, id="h1d32-N97-M131-multitile"),
    pytest.param(3, 40, 70, 19, 2, 1.0, id="h3d40-N70-M19-B2"),
]


def _inputs(heads, d, N, M, B, mag, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = heads * d
    q = (torch.randn(B, N, C, generator=g) * mag).requires_grad_()
    # k and v as the two column halves of one (B, M, 2C) kv projection (row stride 2C)
    kv = torch.randn(B, M, 2 * C, generator=g)
    kv[..., :C] *= mag
    return q, kv.requires_grad_()


def _split_kv(fn, heads):
    def run(q, kv):
        C = q.shape[-1]
        return fn(q, kv[..., :C], kv[..., C:], heads, (C // heads) ** -0.5)
    return run


@pytest.mark.parametrize("heads,d,N,M,B,mag", CASES)
def test_contract(heads, d, N, M, B, mag, order):
    """fp32 forward + backward, fp16/bf16 forward, in both block orders."""
    q, kv = _inputs(heads, d, N, M, B, mag)
    fused, ref = _split_kv(cuda_attention, heads), _split_kv(reference.sra_attention, heads)
    results = check_op(fused, ref, [q, kv], torch.float32, name="cuda fp32")
    results += check_op(fused, ref, [q, kv], torch.float16, backward=False, name="cuda fp16")
    results += check_op(fused, ref, [q, kv], torch.bfloat16, backward=False, name="cuda bf16")
    for r in results:
        print(order, r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("heads,d,N,M,B,mag", [CASES[0], CASES[3], CASES[4], CASES[5]])
def test_half_backward(heads, d, N, M, B, mag, dtype, order):
    """fp16/bf16 gradients (tensor-core MMA path) on the batch, sharp-softmax, multi-key-tile and
    padded-head-dim cases."""
    q, kv = _inputs(heads, d, N, M, B, mag)
    for r in check_op(_split_kv(cuda_attention, heads), _split_kv(reference.sra_attention, heads),
                      [q, kv], dtype, name=f"cuda {dtype}"):
        print(order, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_head_dim_128_explicit_scale_separate_kv(emu, dtype):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 40, 128, generator=g, requires_grad=True)
    k = torch.randn(1, 20, 128, generator=g, requires_grad=True)
    v = torch.randn(1, 20, 128, generator=g, requires_grad=True)
    check_op(lambda q, k, v: cuda_attention(q, k, v, 1, 0.3),
             lambda q, k, v: reference.sra_attention(q, k, v, 1, 0.3), [q, k, v], dtype, name="d128")


def test_backward_is_deterministic(emu):
    """dK/dV are per-chunk fp32 partial sums added in a fixed order: bitwise equal across block
    orders and concurrent workers (the Triton kernel's guarantee)."""
    q, kv = _inputs(1, 64, 300, 37, 2, 1.0)
    C = q.shape[-1]
    k, v = kv.detach()[..., :C], kv.detach()[..., C:]
    o, lse = K.sra_attention_fwd(q.detach(), k, v, 1, 0.125)
    do = torch.randn_like(o)
    assert K.sra_attention_bwd(do, q.detach(), k, v, lse, 1, 0.125) is not None
    runs = []
    for setting in (("sequential", 0, 1), ("shuffled", 1, 2), ("reverse", 0, 2)):
        emu.emu_configure(*setting, 80)
        runs.append(K.sra_attention_bwd(do, q.detach(), k, v, lse, 1, 0.125))
    emu.emu_configure("sequential", 0, 1, 80)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_shared_memory_fits_consumer_gpus(emu):
    """Every (dtype, padded head dim) configuration launches under sm_86's 99 KB opt-in cap, so the
    sm_80 binary also runs on RTX 30xx/40xx-class GPUs."""
    emu.emu_configure("sequential", 0, 1, 86)
    try:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for d in (32, 64, 128):
                q, k, v = (torch.randn(1, n, d, dtype=dtype) for n in (3, 2, 2))
                o, lse = K.sra_attention_fwd(q, k, v, 1, 0.1)
                K.sra_attention_bwd(torch.ones_like(o), q, k, v, lse, 1, 0.1)
    finally:
        emu.emu_configure("sequential", 0, 1, 80)


def test_emulation_refuses_without_opt_in():
    old = os.environ.pop(K.EMULATE_ENV, None)
    try:
        with pytest.raises(ValueError, match="SEGFORMER_FAST_CUDA_EMULATE=1"):
            K.native(torch.device("cpu"))
        x = torch.randn(1, 5, 8)
        with pytest.raises(backends.BackendUnavailable, match="cuda: CPU tensors need SEGFORMER_FAST_CUDA_EMULATE=1"):
            sra_attention(x, x, x, 2, backend="cuda")
    finally:
        if old is not None:
            os.environ[K.EMULATE_ENV] = old


def test_dispatch(emu):
    """Named, the emulation runs CPU tensors; auto never picks it; head dims > 128 are refused."""
    assert backends.which("sra_attention", "cpu", torch.float16, backend="cuda").name == "cuda"
    assert backends.which("sra_attention", "cpu", torch.float32).name != "cuda"
    bad = backends.which("sra_attention", "cpu", torch.float32, backend="cuda", facts={"head_dim": 160})
    assert bad.name is None and "cuda: head dim 160 > 128" in bad.error
    assert "float64" in backends.which("sra_attention", "cpu", torch.float64, backend="cuda").error


def test_opcheck(emu):
    """Schema, fake kernels, autograd registration of the two custom ops (emulated build)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 16, generator=g) for n in (9, 4, 4))
    o, lse = torch.ops.segformer_fast.cuda_sra_attention_fwd(q, k, v, 2, 0.25)
    torch.library.opcheck(torch.ops.segformer_fast.cuda_sra_attention_fwd.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 2, 0.25))
    torch.library.opcheck(torch.ops.segformer_fast.cuda_sra_attention_bwd.default,
                          (torch.randn_like(o), q.detach(), k.detach(), v.detach(), lse, 2, 0.25))


@pytest.mark.gpu
@pytest.mark.parametrize("heads,d,N,M,B,mag", [CASES[0], CASES[2], CASES[4]])
def test_gpu_contract(heads, d, N, M, B, mag):
    q, kv = _inputs(heads, d, N, M, B, mag)
    q, kv = q.detach().cuda().requires_grad_(), kv.detach().cuda().requires_grad_()
    fused, ref = _split_kv(cuda_attention, heads), _split_kv(reference.sra_attention, heads)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        check_op(fused, ref, [q, kv], dtype, name=f"gpu {dtype}")


# ------------------------------------------------------------------------------ nvcc, ahead of time
@needs_nvcc
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("cu", CU_FILES)
def test_nvcc_no_spills(cu, arch):
    """Every .cu under csrc/cuda compiled once per arch, as the GPU build compiles it; ptxas must
    report 0 spill bytes for every kernel; registers are printed."""
    assert_no_spills(cu, arch)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_gpu_binding_syntax():
    """The GPU build's binding (CUDA stream + device guard) compiles here against the CPU torch's
    c10/cuda headers (no CUDA torch needed; linking cannot be checked without one)."""
    from torch.utils.cpp_extension import include_paths

    cuda_include = Path(NVCC).resolve().parent.parent / "include"
    if not (cuda_include / "cuda_runtime_api.h").exists():
        cuda_include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    cmd = ["g++", "-fsyntax-only", "-std=c++17", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           "-DTORCH_EXTENSION_NAME=segformer_fast_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-I{CSRC}", f"-I{cuda_include}", *(f"-I{p}" for p in include_paths()),
           f"-I{__import__('sysconfig').get_paths()['include']}", str(CSRC / "bindings" / "cuda.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def test_traffic_model():
    """The CUDA kernel's model at SegFormer-B0 stage 1, 512x512 (N = 16384, M = 256, C = 32):
    HBM traffic is the inputs and outputs only, far below the reference sequence's."""
    from segformer_fast.analysis.cuda_sra_attention import cuda_sra_attention_cost
    from segformer_fast.analysis.sra_attention import sra_attention_cost

    B, N, M, C, H = 1, 16384, 256, 32, 1
    fwd = cuda_sra_attention_cost(B, N, M, C, H, torch.float16)
    assert fwd["hbm"].bytes == (N * C + 2 * M * C) * 2 + N * C * 2 + N * 4
    assert fwd["useful_flops"] == 4 * N * M * C and fwd["padding_overhead"] == 0.0
    both = cuda_sra_attention_cost(B, N, M, C, H, torch.float16, backward=True)
    ref = sra_attention_cost(B, N, M, C, H, torch.float16, backward=True)["reference"]
    assert both["hbm"].bytes < ref.bytes / 10
    assert both["splits"] >= 2 and both["blocks"]["dkdv"] == 4 * both["splits"]
    for dtype in (torch.float32, torch.float16):
        for d in (32, 40, 64, 128):
            m = cuda_sra_attention_cost(1, 70, 19, d, 1, dtype, backward=True)
            assert max(m["smem_bytes"].values()) <= 101376          # sm_86/89 opt-in cap
    assert cuda_sra_attention_cost(1, 64, 64, 40, 1)["padding_overhead"] == pytest.approx(64 / 40 - 1)
    print(both["hbm"], f"L2 {both['l2_bytes'] / 1e6:.1f} MB, splits {both['splits']}")
