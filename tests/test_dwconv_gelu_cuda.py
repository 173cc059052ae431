"""The CUDA C++ Mix-FFN core (csrc/cuda/dwconv_gelu.cu).

Without a GPU: ``dwconv_gelu(..., backend="cuda")`` runs the kernels in the CUDA emulation
(SEGFORMER_FAST_CUDA_EMULATE=1, CPU tensors) against the fp64 reference on the Triton twin's odd
shapes (1x1 and 9x1 maps, C not a multiple of 16, batch 2, non-square, large inputs, tanh GELU) plus
a C that allows no vector access, in two block orders; the backward is bitwise deterministic across
orders and worker threads; the .cu compiles with nvcc for sm_80 and sm_90a with 0 spills. With a
GPU: the nvcc build on CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch

from segformer_fast import backends, reference
from segformer_fast.kernels import cuda as K
from segformer_fast.ops.dwconv_gelu import dwconv_gelu
from segformer_fast.testing import assert_contract, check_op
from test_dwconv_gelu import CASES as TRITON_CASES, GPU_CASES, make_args

from cuda_testing import ARCHS, assert_no_spills, emu, needs_nvcc, order  # noqa: F401

# the Triton twin's shapes, plus C = 33: no vector access in any dtype (V = 1 path)
CASES = {**TRITON_CASES, "5x4_c33": (1, 5, 4, 33, "none", 1.0)}
# every dtype forward + backward on these; fp32 backward and fp16/bf16 forward on the rest
FULL = ("11x19_c72_b2", "6x5_tanh", "5x4_c33")


def cuda_dwconv(x, hw, w, b, a):
    return dwconv_gelu(x, hw, w, b, a, backend="cuda")


@pytest.mark.parametrize("case", list(CASES))
def test_contract(case, order):
    args = make_args(*CASES[case])
    full = case in FULL
    res = check_op(cuda_dwconv, reference.dwconv_gelu, args, torch.float32, name=f"cuda {case}")
    for dtype in (torch.float16, torch.bfloat16):
        res += check_op(cuda_dwconv, reference.dwconv_gelu, args, dtype, backward=full, name=f"cuda {case}")
    print(order, *res, sep="\n")


def _grads(x, H, W, w, b, dy, approximate, dtype):
    x, w, b = (t.detach().to(dtype).requires_grad_() for t in (x, w, b))
    reference.dwconv_gelu(x, (H, W), w, b, approximate).backward(dy.to(dtype))
    return x.grad, w.grad, b.grad


def test_blocks_walk_several_tiles(emu):
    """Fewer backward blocks than tiles: each block sums its partials over a strided list of tiles
    (2 rows for 2 x 3 x 3 = 18 tiles), still within the contract."""
    x, (H, W), w, b, a = make_args(2, 19, 23, 40, "none", 1.0)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    ref, pt = _grads(x, H, W, w, b, dy, a, torch.float64), _grads(x, H, W, w, b, dy, a, torch.float32)
    for rows in (2, 7):
        out = K.dwconv_gelu_bwd(dy, x.detach(), H, W, w.detach(), b.detach(), a, partial_rows=rows)
        for name, o, r, p in zip(("dx", "dw", "db"), out, ref, pt):
            print(rows, assert_contract(o, r, p, 3.0, f"{name} rows={rows}"))


def test_no_bias_and_strided_input(emu):
    x, hw, w, b, a = make_args(1, 5, 7, 40, "none", 1.0)
    check_op(lambda x, w: cuda_dwconv(x, hw, w, None, a), lambda x, w: reference.dwconv_gelu(x, hw, w, None, a),
             [x, w], torch.float32, name="no bias")
    # a non-contiguous view of tokens (the op makes it contiguous before the launch)
    big = torch.randn(1, 35, 80)
    xs = big[..., ::2]
    torch.testing.assert_close(cuda_dwconv(xs, hw, w.detach(), b.detach(), a),
                               reference.dwconv_gelu(xs, hw, w.detach(), b.detach(), a))


def test_backward_is_deterministic(emu):
    """dw/db are per-block fp32 partials added in a fixed order: bitwise equal across block orders
    and concurrent workers."""
    x, (H, W), w, b, a = make_args(2, 19, 23, 40, "none", 1.0)
    dy = torch.randn(x.shape)
    runs = []
    for setting in (("sequential", 0, 1), ("shuffled", 3, 2), ("reverse", 0, 2)):
        emu.emu_configure(*setting, 80)
        runs.append(K.dwconv_gelu_bwd(dy, x.detach(), H, W, w.detach(), b.detach(), a, partial_rows=5))
    emu.emu_configure("sequential", 0, 1, 80)
    for other in runs[1:]:
        for u, v in zip(runs[0], other):
            assert torch.equal(u, v)


def test_refusals_before_launch(emu, monkeypatch):
    """fp64 is refused by dispatch (reason named), auto never picks the emulation, and no kernel is
    launched for a call that fails its checks."""
    calls = []
    monkeypatch.setattr(K, "dwconv_gelu_fwd", lambda *a: calls.append(a))
    x, hw, w, b, a = make_args(1, 3, 4, 8, "none", 1.0)
    with pytest.raises(backends.BackendUnavailable, match="cuda: dtype torch.float64"):
        dwconv_gelu(x.double(), hw, w.double(), b.double(), backend="cuda")
    with pytest.raises(ValueError, match="hw=\\(3, 5\\)"):
        dwconv_gelu(x, (3, 5), w, b, backend="cuda")
    assert calls == []
    assert backends.which("dwconv_gelu", "cpu", torch.float32).name != "cuda"
    assert backends.which("dwconv_gelu", "cpu", torch.bfloat16, backend="cuda").name == "cuda"


def test_opcheck(emu):
    """Schema, fake kernels, autograd registration of the two custom ops (emulated build)."""
    x, (H, W), w, b, a = make_args(1, 3, 4, 8, "tanh", 1.0)
    torch.library.opcheck(torch.ops.segformer_fast.cuda_dwconv_gelu.default, (x, H, W, w, b, a))
    torch.library.opcheck(torch.ops.segformer_fast.cuda_dwconv_gelu_backward.default,
                          (torch.randn(x.shape), x.detach(), H, W, w.detach(), b.detach(), a))


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES) + ["11x19_c72_b2", "9x1"])
def test_gpu_contract(case):
    args = make_args(*{**CASES, **GPU_CASES}[case], device="cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        check_op(cuda_dwconv, reference.dwconv_gelu, args, dtype, name=f"gpu {case}")


@needs_nvcc
@pytest.mark.parametrize("arch", list(ARCHS))
def test_nvcc_no_spills(arch):
    kernels = assert_no_spills("cuda/dwconv_gelu.cu", arch)
    assert sum("dwconv_bwd_kernel" in k for k in kernels) == 6      # fp32/fp16/bf16 x vector/scalar


def test_traffic_model():
    """SegFormer-B0 stage 1 Mix-FFN at 512x512 (128x128 map, C = 128), fp16: the forward moves x and
    y once; the fused backward reads x and dy once and writes dx (g never reaches memory), about half
    of the two-kernel Triton backward's bytes."""
    from segformer_fast.analysis.cuda_dwconv_gelu import cuda_dwconv_gelu_cost
    from segformer_fast.analysis.dwconv_gelu import dwconv_gelu_cost

    B, H, W, C = 1, 128, 128, 128
    E = B * H * W * C
    fwd = cuda_dwconv_gelu_cost(B, H, W, C, torch.float16)
    assert fwd["hbm"].bytes == 2 * E * 2 + 10 * C * 2
    assert fwd["smem_bytes"]["fwd"] <= 48 * 1024 and fwd["l2_bytes"] == pytest.approx(E * 2 * 100 / 64)
    both = cuda_dwconv_gelu_cost(B, H, W, C, torch.float16, backward=True)
    assert both["smem_bytes"]["bwd"] <= 48 * 1024 and both["partial_rows"] == 256
    triton = dwconv_gelu_cost(B, H, W, C, 2, backward=True)["fused"]
    assert both["hbm"].bytes < 0.65 * triton.bytes
    print(both["hbm"], f"Triton fused {triton.bytes / 1e6:.1f} MB")
