"""The native CPU upsample-sum kernel (csrc/cpu/upsample_sum.cpp) against the reference."""
import importlib

import pytest
import torch

from segformer_fast import backends, reference
from segformer_fast.ops import upsample_sum
from segformer_fast.testing import assert_contract


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
    calls = []
    real = native.upsample_sum_forward

    class Spy:
        def upsample_sum_forward(self, *a):
            calls.append(a)
            return real(*a)

    import segformer_fast.kernels.cpu as kcpu
    orig = kcpu.native
    kcpu.native = lambda: Spy()
    try:
        with torch.no_grad():
            out = upsample_sum(maps, hws, size, relu=relu, backend="cpu", **kw)
    finally:
        kcpu.native = orig
    assert len(calls) == 1, "the native kernel did not run"
    ref = reference.upsample_sum([m.double() for m in maps], hws, size, relu=relu,
                                 **{k: v.double() for k, v in kw.items()})
    pt = reference.upsample_sum(maps, hws, size, relu=relu, **kw)
    assert out.shape == (B, size[0] * size[1], D) and out.dtype == torch.float32
    print(assert_contract(out, ref, pt, name=f"cpu upsample_sum {hws} {epilogue}"))


def test_auto_uses_native_for_inference_and_torch_for_training(native, monkeypatch):
    hws, D = ODD, 16
    maps = _maps(2, D, hws)
    used = []
    op = importlib.import_module("segformer_fast.ops.upsample_sum")   # the module, not the function
    monkeypatch.setattr(op, "_cpu_impl", lambda *a: used.append("cpu") or op._torch_impl(*a))
    with backends.use_backend("auto"), torch.no_grad():
        upsample_sum(maps, hws, hws[0])
    assert used == ["cpu"]
    leaf = [m.clone().requires_grad_() for m in maps]
    with backends.use_backend("auto"):
        y = upsample_sum(leaf, hws, hws[0], relu=True)
    assert used == ["cpu"], "a call that needs gradients must take the differentiable path"
    y.sum().backward()
    assert all(m.grad is not None for m in leaf)
    with torch.no_grad():
        upsample_sum([m.half() for m in maps], hws, hws[0], backend="cpu")   # fp16: torch path
    assert used == ["cpu"]


def test_cpu_backend_rejects_other_devices():
    with pytest.raises(ValueError, match="CPU tensors"):
        backends.resolve(torch.device("meta"), "cpu", ("triton", "cpu"))
    # ops without a native CPU kernel run the torch composition under backend "cpu"
    assert backends.resolve(torch.device("cpu"), "cpu", ("triton",)) == "torch"
