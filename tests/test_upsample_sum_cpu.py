"""The native CPU upsample-sum kernel (csrc/cpu/upsample_sum.cpp) against the reference."""
import functools

import pytest
import torch

from segformer_fast import backends, reference
from segformer_fast.ops import upsample_sum
from segformer_fast.testing import assert_contract
from native_testing import count_native

_count_native = functools.partial(count_native, entry="upsample_sum_forward")


@pytest.fixture(scope="module")
def native():
    # built once per machine (cached under SEGFORMER_FAST_BUILD_DIR); CI has a compiler, so a
    # failed build fails here instead of silently testing the fallback
    from segformer_fast.kernels.cpu import native as load

    return load()


def _maps(B, D, hws, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h * w, D, generator=g) * scale for h, w in hws]


ODD = [(25, 33), (13, 17), (7, 9), (4, 5)]


@pytest.mark.parametrize("epilogue", ["none", "bias", "bn_relu", "relu"])
@pytest.mark.parametrize("hws,B,D", [(ODD, 2, 40), (ODD[1:], 1, 24), ([(9, 8), (9, 8), (3, 2)], 2, 7),
                                     ([(1, 1), (31, 1)], 1, 5)])
def test_contract(native, hws, B, D, epilogue):
    size = hws[0] if hws[0] != (1, 1) else (31, 1)
    maps = _maps(B, D, hws, scale=30.0)
    g = torch.Generator().manual_seed(1)
    kw = {}
    if epilogue in ("bias", "bn_relu"):
        kw["bias"] = torch.randn(D, generator=g)
    if epilogue == "bn_relu":
        kw["scale"] = torch.rand(D, generator=g) + 0.5
        kw["shift"] = torch.randn(D, generator=g)
    relu = epilogue in ("bn_relu", "relu")
    with torch.no_grad(), _count_native(native) as calls:
        out = upsample_sum(maps, hws, size, relu=relu, backend="cpu", **kw)
    assert len(calls) == 1, "the native kernel did not run"
    ref = reference.upsample_sum([m.double() for m in maps], hws, size, relu=relu,
                                 **{k: v.double() for k, v in kw.items()})
    pt = reference.upsample_sum(maps, hws, size, relu=relu, **kw)
    assert out.shape == (B, size[0] * size[1], D) and out.dtype == torch.float32
    print(assert_contract(out, ref, pt, name=f"cpu upsample_sum {hws} {epilogue}"))


def test_auto_uses_native_for_inference_and_torch_for_training(native):
    """The native kernel declares fp32 and no backward: auto takes it for fp32 inference and the
    torch composition otherwise (a declared reason, visible in the query), never silently."""
    from segformer_fast.backends import which

    assert which("upsample_sum", "cpu", torch.float32, backend="auto").name == "cpu"
    training = which("upsample_sum", "cpu", torch.float32, backend="auto", needs_grad=True)
    assert training.name == "torch" and training.reasons["cpu"] == ["no backward: this call needs gradients"]
    assert which("upsample_sum", "cpu", torch.bfloat16, backend="auto").name == "cpu"
    half = which("upsample_sum", "cpu", torch.float16, backend="auto")
    assert half.name == "torch" and "dtype torch.float16" in half.reasons["cpu"][0]

    hws, D = ODD, 16
    maps = _maps(2, D, hws)
    with backends.use_backend("auto"), torch.no_grad(), _count_native(native) as calls:
        upsample_sum(maps, hws, hws[0])
    assert len(calls) == 1
    leaf = [m.clone().requires_grad_() for m in maps]
    with backends.use_backend("auto"), _count_native(native) as calls:
        y = upsample_sum(leaf, hws, hws[0], relu=True)
    assert calls == [], "a call that needs gradients must take the differentiable path"
    y.sum().backward()
    assert all(m.grad is not None for m in leaf)


def test_cpu_by_name_refuses_what_it_cannot_run(native):
    """Asked for by name, cpu runs or raises one error listing every implementation's reasons."""
    hws = ODD
    leaf = [m.requires_grad_() for m in _maps(1, 8, hws)]
    with pytest.raises(backends.BackendUnavailable, match="cpu: no backward") as e:
        upsample_sum(leaf, hws, hws[0], backend="cpu")
    assert all(f"  {n}: " in str(e.value) for n in ("triton", "cpu", "torch", "reference"))
    with torch.no_grad(), pytest.raises(backends.BackendUnavailable, match="cpu: dtype torch.float16"):
        upsample_sum([m.half() for m in leaf], hws, hws[0], backend="cpu")
    with pytest.raises(backends.BackendUnavailable, match="cpu: needs cpu tensors, got meta"):
        upsample_sum([m.detach().to("meta") for m in leaf], hws, hws[0], backend="cpu")


def test_cpu_name_on_ops_without_native_kernel_is_the_torch_composition():
    from segformer_fast.backends import which

    for op in ("dwconv_gelu", "conv_layernorm"):      # (sra_attention has its bf16 kernel)
        c = which(op, "cpu", backend="cpu")
        assert c.name == "cpu" and c.same_as == "torch", c
        assert which(op, "cpu", backend="auto").name == "torch"
        assert which(op, "meta", backend="cpu").name is None


@pytest.mark.parametrize("epilogue", ["bias", "bn_relu"])
@pytest.mark.parametrize("hws,B,D", [(ODD, 2, 40), ([(9, 8), (9, 8), (3, 2)], 1, 7)])
def test_contract_bf16(native, hws, B, D, epilogue):
    """bf16 maps: fp32 sums, one rounding at the end; output bf16, within the contract of the
    reference run in bf16 (several roundings) against fp64."""
    size = hws[0]
    maps = [m.bfloat16() for m in _maps(B, D, hws, scale=30.0)]
    g = torch.Generator().manual_seed(1)
    kw = {"bias": torch.randn(D, generator=g)}
    if epilogue == "bn_relu":
        kw["scale"] = torch.rand(D, generator=g) + 0.5
        kw["shift"] = torch.randn(D, generator=g)
    relu = epilogue == "bn_relu"
    kw16 = {k: v.bfloat16() for k, v in kw.items()}
    with torch.no_grad(), _count_native(native) as calls:
        out = upsample_sum(maps, hws, size, relu=relu, backend="cpu", **kw16)
    assert len(calls) == 1 and out.dtype == torch.bfloat16
    ref = reference.upsample_sum([m.double() for m in maps], hws, size, relu=relu,
                                 **{k: v.double() for k, v in kw16.items()})
    pt = reference.upsample_sum(maps, hws, size, relu=relu, **kw16)
    print(assert_contract(out, ref, pt, name=f"cpu upsample_sum bf16 {hws} {epilogue}"))


def test_autocast_runs_native_bf16(native):
    """Under CPU bf16 autocast the native kernel runs in bf16 (not an fp32 detour)."""
    hws = ODD[1:]
    maps = _maps(1, 16, hws)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _count_native(native) as calls:
        out = upsample_sum(maps, hws, hws[0], bias=torch.randn(16), relu=True)
    assert len(calls) == 1 and calls[0][0][0].dtype == torch.bfloat16 and out.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_portable_fallback_gives_the_same_numbers(native, monkeypatch, dtype):
    """SEGFORMER_FAST_CPU_ISA=portable forces the plain C++ instantiation (what a machine without
    AVX-512 runs): bit-identical to the AVX-512 one (no FMA contraction in either)."""
    hws, D = [(25, 33), (13, 17), (7, 9), (25, 33)], 37
    maps = [m.to(dtype) for m in _maps(2, D, hws, scale=10.0)]
    bias, scale, shift = (torch.randn(D) for _ in range(3))
    with torch.no_grad():
        monkeypatch.delenv("SEGFORMER_FAST_CPU_ISA", raising=False)
        fast_isa = native.cpu_isa()
        fast = upsample_sum(maps, hws, hws[0], bias=bias.to(dtype), scale=scale.to(dtype),
                            shift=shift.to(dtype), relu=True, backend="cpu")
        monkeypatch.setenv("SEGFORMER_FAST_CPU_ISA", "portable")
        assert native.cpu_isa() == "portable"
        slow = upsample_sum(maps, hws, hws[0], bias=bias.to(dtype), scale=scale.to(dtype),
                            shift=shift.to(dtype), relu=True, backend="cpu")
    assert torch.equal(fast, slow), f"{fast_isa} vs portable: max diff {(fast.float() - slow.float()).abs().max()}"
