"""conv + LayerNorm (patch embedding, sequence reduction): Triton kernels under the interpreter,
the torch backend, input checks, drop-in modules, torch.compile (AOT compile: tests/test_kernels_aot.py; cost model: tests/test_cost_models.py)."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

from segformer_fast import reference as R
from segformer_fast.kernels.triton import conv_layernorm as K
from segformer_fast.ops.conv_layernorm import conv_layernorm
from segformer_fast.testing import check_op, init_realistic_

# (name, B, Cin, H, W, Cout, k, stride, padding, tokens, eps) — the odd shapes
CASES = [
    ("stem_image_k7s4p3", 2, 3, 45, 61, 32, 7, 4, 3, False, 1e-5),
    ("tokens_k3s2p1", 1, 40, 23, 31, 72, 3, 2, 1, True, 1e-6),
    ("sr4_floor", 2, 64, 29, 37, 64, 4, 4, 0, True, 1e-6),
    ("sr8_9x8", 1, 32, 9, 8, 32, 8, 8, 0, True, 1e-5),
]
# SegFormer scale, CUDA only (the GPU tile configurations): B1+ stem at 512^2, stage-2 embedding,
# stage-1 sequence reduction (sr 8)
GPU_CASES = [
    ("b1_stem_512", 2, 3, 512, 512, 64, 7, 4, 3, False, 1e-6),
    ("b1_embed2", 2, 64, 128, 128, 128, 3, 2, 1, True, 1e-6),
    ("b1_sr8", 2, 64, 128, 128, 64, 8, 8, 0, True, 1e-5),
]
IDS = [c[0] for c in CASES]
ALL = [pytest.param(c, id=c[0]) for c in CASES] + [pytest.param(c, id=c[0], marks=pytest.mark.gpu)
                                                   for c in GPU_CASES]


def make_args(B, Cin, H, W, Cout, k, stride, padding, tokens, eps, scale=1.0, bias=True, affine=True, seed=0,
              device="cpu"):
    """Realistic-scale weights (std 1/sqrt(fan_in), LayerNorm affine away from identity)."""
    conv = nn.Conv2d(Cin, Cout, k, stride, padding, bias=bias)
    ln = nn.LayerNorm(Cout, eps=eps, elementwise_affine=affine)
    init_realistic_(conv, seed)
    init_realistic_(ln, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(B, Cin, H, W, generator=g) * scale
    if tokens:
        x = x.flatten(2).transpose(1, 2).contiguous()
    ts = [x, conv.weight, conv.bias, ln.weight, ln.bias]
    ts = [None if t is None else t.detach().to(device).requires_grad_() for t in ts]
    return ts + [stride, padding, eps, (H, W) if tokens else None]


class _Counting:
    """Proxy for a @triton.jit kernel counting launches (kernel[grid](...))."""

    def __init__(self, fn, counts, key):
        self.fn, self.counts, self.key = fn, counts, key

    def __getitem__(self, grid):
        self.counts[self.key] += 1
        return self.fn[grid]


@pytest.fixture
def launches(monkeypatch):
    counts = {"fwd": 0, "bwd": 0}
    monkeypatch.setattr(K, "_conv_ln_fwd_kernel", _Counting(K._conv_ln_fwd_kernel, counts, "fwd"))
    monkeypatch.setattr(K, "_conv_ln_bwd_kernel", _Counting(K._conv_ln_bwd_kernel, counts, "bwd"))
    return counts


def _op(backend):
    return lambda *a: conv_layernorm(*a, backend=backend)


def _report(results):
    for r in results:
        print(r)


@pytest.mark.parametrize("case", ALL)
def test_triton_fp32_forward_backward(case, launches, device):
    args = make_args(*case[1:], device=device)
    _report(check_op(_op("triton"), R.conv_layernorm, args, torch.float32, name=f"triton {case[0]}"))
    assert launches["fwd"] >= 1 and launches["bwd"] >= 1, launches


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ALL)
def test_triton_low_precision_forward(case, dtype, launches, device):
    args = make_args(*case[1:], device=device)
    _report(check_op(_op("triton"), R.conv_layernorm, args, dtype, backward=False, name=f"triton {case[0]}"))
    assert launches["fwd"] >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_large_magnitude(dtype, launches, device):
    # inputs of magnitude ~300 (conv outputs ~1e2..1e3: fp16-safe, LayerNorm must cancel the scale)
    args = make_args(2, 40, 23, 31, 72, 3, 2, 1, True, 1e-6, scale=300.0, seed=3, device=device)
    _report(check_op(_op("triton"), R.conv_layernorm, args, dtype, backward=dtype == torch.float32,
                     name="triton large"))
    assert launches["fwd"] >= 1


def test_triton_without_bias_and_affine(launches, device):
    args = make_args(1, 24, 11, 13, 40, 3, 2, 1, True, 1e-5, bias=False, affine=False, device=device)
    _report(check_op(_op("triton"), R.conv_layernorm, args, torch.float32, name="triton no-affine"))
    assert launches["fwd"] >= 1 and launches["bwd"] >= 1


def test_triton_non_contiguous_tokens(launches):
    # tokens that are a transposed view of an NCHW map: read through strides (reshape copies once)
    B, C, H, W = 1, 16, 10, 12
    img = torch.randn(B, C, H, W)
    conv, ln = init_realistic_(nn.Conv2d(C, 32, 2, 2)), init_realistic_(nn.LayerNorm(32))
    x = img.flatten(2).transpose(1, 2)
    out, hw = conv_layernorm(x, conv.weight, conv.bias, ln.weight, ln.bias, 2, 0, 1e-5, (H, W), backend="triton")
    ref, rhw = R.conv_layernorm(img, conv.weight, conv.bias, ln.weight, ln.bias, 2, 0, 1e-5)
    assert hw == rhw == (5, 6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert launches["fwd"] == 1


@pytest.mark.parametrize("case", ALL)
def test_torch_backend_contract(case, launches, device):
    args = make_args(*case[1:], device=device)
    _report(check_op(_op("torch"), R.conv_layernorm, args, torch.float32, name=f"torch {case[0]}"))
    _report(check_op(_op("torch"), R.conv_layernorm, args, torch.float16, backward=False, name=f"torch {case[0]}"))
    assert launches == {"fwd": 0, "bwd": 0}


def test_output_size_and_reference_backend():
    args = make_args(*CASES[2][1:])
    out, hw = conv_layernorm(*args, backend="reference")
    assert hw == (7, 9) and out.shape == (2, 63, 64)          # floor((29-4)/4)+1, floor((37-4)/4)+1
    out2, hw2 = conv_layernorm(*args, backend="triton")
    assert hw2 == hw and out2.shape == out.shape


# ----------------------------------------------------------------------------------------------
# bad inputs raise before any launch

def _bad_cases():
    w = torch.randn(8, 4, 3, 3)
    b, g, be = torch.randn(8), torch.randn(8), torch.randn(8)
    img = torch.randn(1, 4, 9, 9)
    tok = torch.randn(1, 81, 4)
    return [
        ("rank", (torch.randn(1, 4, 9, 9, 1), w, b, g, be, 2, 1, 1e-5), ValueError, "rank"),
        ("tokens without hw", (tok, w, b, g, be, 2, 1, 1e-5), ValueError, "hw"),
        ("H*W != N", (tok, w, b, g, be, 2, 1, 1e-5, (8, 9)), ValueError, "H\\*W=72"),
        ("channel mismatch", (torch.randn(1, 5, 9, 9), w, b, g, be, 2, 1, 1e-5), ValueError, "5 input channels"),
        ("norm shape", (img, w, b, torch.randn(7), be, 2, 1, 1e-5), ValueError, "norm_weight"),
        ("mixed dtypes", (img.half(), w, b, g, be, 2, 1, 1e-5), TypeError, "dtype"),
        ("integer input", (img.long(), w.long(), None, None, None, 2, 1, 1e-5), TypeError, "floating"),
        ("mixed devices", (img, w, b.to("meta"), g, be, 2, 1, 1e-5), ValueError, "meta"),
        ("weight rank", (img, w[:, :, 0], b, g, be, 2, 1, 1e-5), ValueError, "weight"),
        ("bad stride", (img, w, b, g, be, 0, 1, 1e-5), ValueError, "stride"),
        ("kernel larger than input", (torch.randn(1, 4, 2, 2), w, b, g, be, 1, 0, 1e-5), ValueError, "smaller"),
    ]


@pytest.mark.parametrize("name,args,exc,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_before_launch(name, args, exc, match, launches):
    with pytest.raises(exc, match=match):
        conv_layernorm(*args, backend="triton")
    assert launches == {"fwd": 0, "bwd": 0}


# ----------------------------------------------------------------------------------------------

def test_torch_compile_traces_custom_op(launches):
    """fullgraph torch.compile through the custom ops (fake impls, autograd); aot_eager runs the
    interpreter kernels under the compiled graph."""
    args = make_args(1, 16, 9, 11, 32, 3, 2, 1, True, 1e-5)
    t0 = time.time()
    fn = torch.compile(lambda *a: conv_layernorm(*a, backend="triton")[0], fullgraph=True, backend="aot_eager")
    out = fn(*args)
    out.square().sum().backward()
    ref, _ = R.conv_layernorm(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert args[0].grad is not None and args[1].grad is not None
    assert launches["fwd"] >= 1 and launches["bwd"] >= 1
    print(f"torch.compile trace + run: {time.time() - t0:.1f}s")
