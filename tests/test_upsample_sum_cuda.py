"""The CUDA C++ decoder epilogue (csrc/cuda/upsample_sum.cu).

Without a GPU: ``upsample_sum(..., backend="cuda")`` runs the kernels in the CUDA emulation
(SEGFORMER_FAST_CUDA_EMULATE=1, CPU tensors) against the fp64 reference on the Triton twin's odd
stage sizes (25x33 from a 97x131 image and its ceil-halvings), on 1x1 and 9x1 maps with a D that
allows no vector access, eval epilogue (bias, folded BatchNorm, ReLU) and training path (bias only),
in two block orders; the backward is bitwise deterministic across orders and worker threads; the .cu
compiles with nvcc for sm_80 and sm_90a with 0 spills.
"""
from __future__ import annotations

import pytest
import torch

from segformer_fast import backends
from segformer_fast import reference as R
from segformer_fast.kernels import cuda as K
from segformer_fast.ops.upsample_sum import upsample_sum
from segformer_fast.testing import check_op
from test_upsample_sum import HWS

from cuda_testing import ARCHS, assert_no_spills, emu, needs_nvcc, order  # noqa: F401

# 1x1 and 9x1 maps upsampled to a non-square 9x5 map (the 9x1 map only along W), D = 13 (no
# vector access in any dtype), plus one map already at the output size
SMALL = [(9, 5), (9, 1), (1, 1), (2, 3)]


def _args(D, hws, B=2, mag=1.0, seed=0, epilogue=True):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(B, h * w, D, generator=g) * mag for h, w in hws]
    params = [torch.randn(D, generator=g) * 0.5]
    if epilogue:
        params += [torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g) * 0.2]
    return [t.requires_grad_() for t in maps + params]


def _fns(hws, n, epilogue=True, backend="cuda"):
    def fused(*a):
        return upsample_sum(list(a[:n]), hws[:n], hws[0], *a[n:], relu=epilogue, backend=backend)

    def ref(*a):
        return R.upsample_sum(list(a[:n]), hws[:n], hws[0], *a[n:], relu=epilogue)
    return fused, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_contract_eval_epilogue(dtype, order):
    """Stage sizes of a 97x131 image, D = 40, large magnitudes: forward and backward in every dtype."""
    fused, ref = _fns(HWS, 4)
    for r in check_op(fused, ref, _args(40, HWS, mag=30.0), dtype, name="cuda eval"):
        print(order, r)


def test_contract_training_path(order):
    """bias only (BatchNorm runs outside on batch statistics), batch 1, 3 maps: no epilogue kernel."""
    fused, ref = _fns(HWS, 3, epilogue=False)
    args = _args(24, HWS, B=1, epilogue=False)
    args = args[:3] + args[4:]
    for dtype in (torch.float32, torch.bfloat16):
        for r in check_op(fused, ref, args, dtype, name="cuda train"):
            print(order, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_contract_tiny_maps(dtype, order):
    fused, ref = _fns(SMALL, 4)
    for r in check_op(fused, ref, _args(13, SMALL, mag=3.0), dtype, name="cuda 1x1/9x1"):
        print(order, r)


def test_backward_is_deterministic(emu):
    """Per-block partials added in a fixed order, the adjoint a gather: bitwise equal results
    across block orders and concurrent workers."""
    args = _args(40, HWS)
    maps, (b, s, sh) = [a.detach() for a in args[:4]], [a.detach() for a in args[4:]]
    grad = torch.randn(2, HWS[0][0] * HWS[0][1], 40)
    runs = []
    for setting in (("sequential", 0, 1), ("shuffled", 5, 2), ("reverse", 0, 2)):
        emu.emu_configure(*setting, 80)
        ep = K.upsample_sum_epilogue_bwd(grad, maps, HWS, HWS[0], b, s, sh, True)
        runs.append(list(ep) + [K.upsample_adjoint(ep[0], hw, HWS[0], torch.float32) for hw in HWS[1:]])
    emu.emu_configure("sequential", 0, 1, 80)
    for other in runs[1:]:
        for u, v in zip(runs[0], other):
            assert torch.equal(u, v)


def test_refusals_before_launch(emu, monkeypatch):
    calls = []
    monkeypatch.setattr(K, "upsample_sum_fwd", lambda *a: calls.append(a))
    maps = [torch.randn(1, h * w, 8) for h, w in HWS]
    with pytest.raises(backends.BackendUnavailable, match="cuda: at most 4 maps"):
        upsample_sum(maps + maps[:1], HWS + HWS[:1], HWS[0], backend="cuda")
    with pytest.raises(backends.BackendUnavailable, match="cuda: dtype torch.float64"):
        upsample_sum([m.double() for m in maps], HWS, HWS[0], backend="cuda")
    with pytest.raises(ValueError, match="H\\*W"):
        upsample_sum(maps, [HWS[0], (13, 16)] + HWS[2:], HWS[0], backend="cuda")
    assert calls == []
    assert backends.which("upsample_sum", "cpu", torch.float16).name != "cuda"


def test_opcheck(emu):
    g = torch.Generator().manual_seed(0)
    hws = [(5, 3), (2, 2)]
    maps = [torch.randn(1, h * w, 8, generator=g) for h, w in hws]
    b, s, sh = (torch.randn(8, generator=g) for _ in range(3))
    flat = [v for hw in hws for v in hw]
    ops = torch.ops.segformer_fast
    torch.library.opcheck(ops.cuda_upsample_sum.default,
                          ([m.requires_grad_() for m in maps], flat, [5, 3], b, s, sh, True))
    grad = torch.randn(1, 15, 8)
    torch.library.opcheck(ops.cuda_upsample_sum_epilogue_bwd.default,
                          (grad, [m.detach() for m in maps], flat, [5, 3], b, s, sh, True))
    torch.library.opcheck(ops.cuda_upsample_adjoint.default, (grad, [2, 2], [5, 3], torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [256, 768])
def test_gpu_contract(D):
    hws = [(128, 128), (64, 64), (32, 32), (16, 16)]
    fused, ref = _fns(hws, 4)
    args = [a.detach().cuda().requires_grad_() for a in _args(D, hws, mag=3.0)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        check_op(fused, ref, args, dtype, name=f"gpu D={D}")


@needs_nvcc
@pytest.mark.parametrize("arch", list(ARCHS))
def test_nvcc_no_spills(arch):
    kernels = assert_no_spills("cuda/upsample_sum.cu", arch)
    assert sum("upsample_adjoint_kernel" in k for k in kernels) == 18    # 3 x 3 dtype pairs x 2 widths


def test_traffic_model():
    """The B0 decoder at 512x512 (maps 128/64/32/16, D = 256), fp16: the forward reads each map once
    and writes the output once; the backward at least reads the gradient and writes one gradient per
    map, and is dominated by the W passes of the adjoint (each reads the full-resolution fp32 dz)."""
    from segformer_fast.analysis.cuda_upsample_sum import cuda_upsample_sum_cost

    hws, D = [(128, 128), (64, 64), (32, 32), (16, 16)], 256
    fwd = cuda_upsample_sum_cost(1, hws, D, torch.float16)
    n_maps = sum(h * w for h, w in hws)
    assert fwd["hbm"].bytes == (n_maps + 128 * 128) * D * 2 + 3 * D * 4
    assert fwd["l2_bytes"] == (128 * 128 + 3 * 4 * 128 * 128) * D * 2
    both = cuda_upsample_sum_cost(1, hws, D, torch.float16, backward=True)
    floor = fwd["hbm"].bytes + 128 * 128 * D * 2 + n_maps * D * 2
    w_passes = 3 * 128 * 128 * D * 4
    assert floor + w_passes < both["hbm"].bytes < floor + 2 * w_passes + 4 * 128 * 128 * D * 4
    assert both["partial_rows"] == 128 * 128 // 32
    print(fwd["hbm"], both["hbm"], sep="\n")
