"""ops.upsample_sum: the fused Triton kernel (interpreter on CPU) and the torch composition meet the
numerics contract on odd stage sizes; bad inputs raise before any launch; torch.compile traces the custom op
(AOT compile for sm_80/sm_90: tests/test_kernels_aot.py)."""

import pytest
import torch

from segformer_fast import reference as R
from segformer_fast.ops.upsample_sum import upsample_sum
from segformer_fast.testing import check_op

K = pytest.importorskip("segformer_fast.kernels.triton.upsample_sum")

# stage-1 map 25x33 (a 97x131 image), the others from ceil-halving
HWS = [(25, 33), (13, 17), (7, 9), (4, 5)]
KERNELS = ("_upsample_sum_fwd_kernel", "_epilogue_bwd_kernel", "_upsample_adjoint_kernel")


class _Counting:
    """Stands in for a @triton.jit kernel and counts launches (kernel[grid](...))."""

    def __init__(self, kernel, log, name):
        self.kernel, self.log, self.name = kernel, log, name

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    log = []
    for name in KERNELS:
        monkeypatch.setattr(K, name, _Counting(getattr(K, name), log, name))
    return log


def _args(D, B=2, mag=1.0, seed=0, epilogue=True, device="cpu", hws=HWS):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(B, h * w, D, generator=g) * mag for h, w in hws]
    params = [torch.randn(D, generator=g) * 0.5]
    if epilogue:
        params += [torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g) * 0.2]
    return [t.to(device).requires_grad_() for t in maps + params]


def _fns(backend, epilogue=True, n=4, hws=HWS):
    def fused(*a):
        return upsample_sum(list(a[:n]), hws[:n], hws[0], *a[n:], relu=epilogue, backend=backend)

    def ref(*a):
        return R.upsample_sum(list(a[:n]), hws[:n], hws[0], *a[n:], relu=epilogue)
    return fused, ref


def test_index_math_matches_interpolate_at_odd_sizes():
    # the fp32 scale PyTorch uses (in / out in float), not the double quotient
    for n_in, n_out in ((13, 25), (17, 33), (7, 25), (9, 33), (4, 25), (5, 33)):
        assert K.fp32_ratio(n_in, n_out) == torch.tensor(n_in, dtype=torch.float32).div(n_out).item()
    # every window covers the true stencil: a one-hot map's upsampling is non-zero only there
    for n_in, n_out in ((13, 25), (4, 33), (7, 9), (2, 128)):
        inv = n_out / n_in
        for i in range(n_in):
            x = torch.zeros(1, 1, 1, n_in, dtype=torch.float64)
            x[..., i] = 1
            hit = torch.nonzero(torch.nn.functional.interpolate(
                x, size=(1, n_out), mode="bilinear", align_corners=False)[0, 0, 0]).flatten()
            lo = max(int((i - 0.5) * inv - 0.5) - 1, 0)
            assert lo <= hit.min() and hit.max() < lo + K.window(n_in, n_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_forward_contract(launches, dtype, device):
    # eval epilogue (bias, BN affine, ReLU), D = 40 (a partial 64-channel block), large magnitudes
    fused, ref = _fns("triton")
    for r in check_op(fused, ref, _args(40, mag=30.0, device=device), dtype, backward=False, name="triton"):
        print(r)
    assert launches == ["_upsample_sum_fwd_kernel"]


def test_triton_backward_contract_eval_epilogue(launches, device):
    fused, ref = _fns("triton")
    for r in check_op(fused, ref, _args(24, device=device), torch.float32, name="triton"):
        print(r)
    assert launches.count("_upsample_sum_fwd_kernel") == 1
    assert launches.count("_epilogue_bwd_kernel") == 1
    # W and H passes for each of the 3 low-resolution maps
    assert launches.count("_upsample_adjoint_kernel") == 6


def test_triton_backward_contract_training_path(launches, device):
    # training: bias only (BatchNorm runs outside on batch statistics); batch 1, 3 maps
    fused, ref = _fns("triton", epilogue=False, n=3)
    args = _args(24, B=1, epilogue=False, device=device)
    args = args[:3] + args[4:]
    for r in check_op(fused, ref, args, torch.float32, name="triton train"):
        print(r)
    assert "_epilogue_bwd_kernel" not in launches
    assert launches.count("_upsample_adjoint_kernel") == 4


def test_triton_any_number_of_maps(launches, device):
    # the kernels unroll over a tuple of maps: five maps (the fifth 1x1) with the full
    # epilogue, forward and backward
    hws = HWS + [(1, 1)]
    fused, ref = _fns("triton", n=5, hws=hws)
    for r in check_op(fused, ref, _args(8, device=device, hws=hws), torch.float32, name="triton 5 maps"):
        print(r)
    assert launches.count("_upsample_sum_fwd_kernel") == 1
    assert launches.count("_epilogue_bwd_kernel") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_backend_contract(dtype, launches, device):
    fused, ref = _fns("torch")
    for r in check_op(fused, ref, _args(40, mag=30.0, device=device), dtype, backward=dtype == torch.float32,
                      name="torch"):
        print(r)
    fused, ref = _fns("torch", epilogue=False)
    check_op(fused, ref, _args(24, epilogue=False, device=device), dtype, backward=dtype == torch.float32,
             name="torch")
    assert launches == []


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [256, 768])
def test_triton_segformer_scale(D, dtype, launches, device):
    """The decoder at 512^2 (stage maps 128/64/32/16, B0/B1 and B2+ widths): forward in every dtype,
    backward in fp32 (CUDA only: real tile configurations)."""
    hws = [(128, 128), (64, 64), (32, 32), (16, 16)]
    fused, ref = _fns("triton", hws=hws)
    args = _args(D, mag=3.0, device=device, hws=hws)
    for r in check_op(fused, ref, args, dtype, backward=dtype == torch.float32, name=f"triton D={D}"):
        print(r)
    assert "_upsample_sum_fwd_kernel" in launches


def test_torch_backend_does_not_mutate_inputs():
    maps = [torch.randn(1, h * w, 8) for h, w in HWS]
    same = [m.clone() for m in maps[:1]]
    b = torch.randn(8)
    with torch.no_grad():
        upsample_sum(maps[:1] + maps[:1], HWS[:1] * 2, HWS[0], bias=b, scale=b, shift=b, relu=True,
                     backend="torch")
    assert torch.equal(maps[0], same[0])


def test_bad_inputs_raise_before_launch(launches):
    D = 8
    maps = [torch.randn(2, h * w, D) for h, w in HWS]
    bad = [
        (ValueError, "H\\*W", dict(maps=maps, hws=[HWS[0], (13, 16)] + HWS[2:], size=HWS[0])),
        (ValueError, "one \\(H, W\\) per map", dict(maps=maps, hws=HWS[:3], size=HWS[0])),
        (TypeError, "dtype", dict(maps=[maps[0].half()] + maps[1:], hws=HWS, size=HWS[0])),
        (ValueError, "expected \\(B=", dict(maps=[maps[0][:1]] + maps[1:], hws=HWS, size=HWS[0])),
        (ValueError, "rank|tokens", dict(maps=[maps[0][0]] + maps[1:], hws=HWS, size=HWS[0])),
        (ValueError, "\\(D,\\)", dict(maps=maps, hws=HWS, size=HWS[0], bias=torch.zeros(D + 1))),
        (ValueError, "size", dict(maps=maps, hws=HWS, size=(25,))),
        (TypeError, "relu", dict(maps=maps, hws=HWS, size=HWS[0], relu=1)),
        (ValueError, "at most 4", dict(maps=maps + maps[:1], hws=HWS + HWS[:1], size=HWS[0],
                                       backend="cuda")),
        (ValueError, "triton: dtype torch.float64 not in", dict(maps=[m.double() for m in maps], hws=HWS,
                                                               size=HWS[0])),
        (ValueError, "unknown backend", dict(maps=maps, hws=HWS, size=HWS[0], backend="nope")),
    ]
    for exc, msg, kw in bad:
        kw.setdefault("backend", "triton")
        with pytest.raises(exc, match=msg):
            upsample_sum(**kw)
    assert launches == []


def test_torch_compile_traces_custom_op(launches):
    # the triton path is a torch.library custom op with a fake: fullgraph traces without a break
    maps = [torch.randn(1, h * w, 16) for h, w in HWS]
    bias, scale = torch.randn(16), torch.rand(16) + 0.5

    def f(a, b, c, d, bias, scale):
        return upsample_sum([a, b, c, d], HWS, HWS[0], bias=bias, scale=scale, shift=bias, relu=True,
                            backend="triton")

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*maps, bias, scale)
    torch.testing.assert_close(out, R.upsample_sum(maps, HWS, HWS[0], bias, scale, bias, True))
    assert launches == ["_upsample_sum_fwd_kernel"]
    # backward traced too (register_autograd -> the backward custom ops, with fakes)
    args = [t.clone().requires_grad_() for t in maps + [bias, scale]]
    torch.compile(f, fullgraph=True, backend="aot_eager")(*args).square().sum().backward()
    ref_args = [t.clone().requires_grad_() for t in maps + [bias, scale]]
    R.upsample_sum(ref_args[:4], HWS, HWS[0], ref_args[4], ref_args[5], ref_args[4],
                   True).square().sum().backward()
    for a, b in zip(args, ref_args):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    assert "_epilogue_bwd_kernel" in launches and "_upsample_adjoint_kernel" in launches

    def g(a, b, c, d, bias):
        return upsample_sum([a, b, c, d], HWS, HWS[0], bias=bias, backend="torch")
    torch.testing.assert_close(torch.compile(g, fullgraph=True, backend="eager")(*maps, bias),
                               R.upsample_sum(maps, HWS, HWS[0], bias))
