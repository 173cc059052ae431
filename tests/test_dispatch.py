"""Dispatch by declared capability, the autocast policy of every op, and opcheck of every custom op.

- ``auto`` takes the first implementation with no reasons; a named backend that cannot run raises
  one error listing every implementation with its reasons; ``backends.which`` says the same.
- Autocast (CPU and CUDA, fp16 and bf16): fp32 parameters meet low-precision activations, the op
  runs in the autocast dtype on every implementation, forward and backward, exactly as if the
  caller had cast the inputs; the custom ops carry the same policy for traced graphs.
"""
from __future__ import annotations

import os

import pytest
import torch

from segformer_fast import backends, reference as R
from segformer_fast.backends import BackendUnavailable, which
from segformer_fast.ops import conv_layernorm, dwconv_gelu, sra_attention, upsample_sum

IMPL_NAMES = ("triton", "cpu", "torch", "reference")


# ---------------------------------------------------------------------------------------------
# dispatch

def test_sra_head_dim_160_runs_on_torch_and_reference():
    """The head-dim limit is the triton kernel's, not the op's: SDPA and the reference take 160."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 320, generator=g, requires_grad=True) for n in (37, 9, 9))
    for backend in ("torch", "reference", "auto"):
        out = sra_attention(q, k, v, 2, backend=backend)
        ref = R.sra_attention(q.double(), k.double(), v.double(), 2)
        assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), backend
    assert which("sra_attention", "cuda", torch.float16, facts={"head_dim": 160}).name == "torch"
    with pytest.raises(BackendUnavailable, match="triton: head dim 160 > 128"):
        sra_attention(q, k, v, 2, backend="triton")


def test_triton_on_cpu_without_interpreter_names_every_implementation(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 5, 16)
    with pytest.raises(BackendUnavailable) as e:
        sra_attention(q, q, q, 2, backend="triton")
    msg = str(e.value)
    print(msg)
    assert msg.count("\n") == 5, msg                       # the header + one line per implementation
    assert "triton: CPU tensors need TRITON_INTERPRET=1" in msg
    assert "\n  cpu: dtype torch.float32 not in (bfloat16)" in msg    # the native kernel is bf16-only
    for name in ("torch", "reference"):
        assert f"\n  {name}: can run it" in msg


def test_unknown_and_missing_backends(monkeypatch):
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        sra_attention(x, x, x, 2, backend="nope")
    monkeypatch.delenv("SEGFORMER_FAST_CUDA_EMULATE", raising=False)
    with pytest.raises(BackendUnavailable, match="cuda: CPU tensors need SEGFORMER_FAST_CUDA_EMULATE=1"):
        dwconv_gelu(torch.randn(1, 6, 8), (2, 3), torch.randn(8, 1, 3, 3), None, backend="cuda")


def test_auto_priority_and_query():
    assert backends.PRIORITY == ("triton", "cuda", "cpu", "torch", "reference")
    for op in ("sra_attention", "dwconv_gelu", "conv_layernorm", "upsample_sum"):
        assert which(op, "cuda", torch.bfloat16, backend="auto").name == "triton"
        on_cpu = which(op, "cpu", torch.float32, backend="auto", needs_grad=True)
        assert on_cpu.name == "torch", on_cpu
        assert "interpreter" in on_cpu.reasons["triton"][0]       # never auto on CPU tensors
        assert which(op, "cuda", torch.float64, backend="auto").name == "torch"
        assert which(op, "meta", torch.float32, backend="auto").name == "torch"
        # every op declares the same names, cpu included (a native kernel or the torch alias);
        # and cuda: every op has CUDA C++ kernels (the emulation on CPU tensors only when named)
        assert tuple(n for n in on_cpu.reasons if n != "cuda") == IMPL_NAMES
        assert "correctness tool" in on_cpu.reasons["cuda"][0]
        assert str(on_cpu).startswith(f"{op}: torch")
    bad = which("upsample_sum", "cuda", torch.float16, backend="cpu")
    assert bad.name is None and "cpu: needs cpu tensors, got cuda" in bad.error
    assert set(backends.ops()) >= {"sra_attention", "dwconv_gelu", "conv_layernorm", "upsample_sum"}


def test_process_wide_backend_and_env(monkeypatch):
    monkeypatch.setenv("SEGFORMER_FAST_BACKEND", "reference")
    assert backends.get_backend() == "reference"
    assert which("dwconv_gelu", "cpu").name == "reference"
    with backends.use_backend("torch"):
        assert which("dwconv_gelu", "cpu").name == "torch"
    monkeypatch.setenv("SEGFORMER_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        backends.get_backend()


# ---------------------------------------------------------------------------------------------
# autocast: each op's inputs (activations, fp32 parameters) and a call

def _op_cases(device):
    g = torch.Generator().manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device)
    hws = [(5, 6), (3, 3)]
    return {
        "sra_attention": (lambda a, p, **kw: sra_attention(a[0], p[0], p[1], 2, **kw),
                          [r(2, 13, 16)], [r(2, 4, 16), r(2, 4, 16)]),
        "dwconv_gelu": (lambda a, p, **kw: dwconv_gelu(a[0], (3, 5), p[0], p[1], **kw),
                        [r(2, 15, 24)], [r(24, 1, 3, 3, scale=0.3), r(24, scale=0.2)]),
        "conv_layernorm": (lambda a, p, **kw: conv_layernorm(a[0], *p, 2, 1, 1e-5, hw=(5, 7), **kw)[0],
                           [r(1, 35, 8)], [r(16, 8, 3, 3, scale=0.2), r(16), 1 + r(16, scale=0.2), r(16)]),
        "upsample_sum": (lambda a, p, **kw: upsample_sum(a, hws, hws[0], *p, relu=True, **kw),
                         [r(2, 30, 8), r(2, 9, 8)], [r(8), 1 + r(8, scale=0.2), r(8)]),
    }


OPS = ("sra_attention", "dwconv_gelu", "conv_layernorm", "upsample_sum")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("op", OPS)
def test_autocast_policy(op, backend, dtype, device):
    """Under autocast the op equals the same op on inputs the caller cast to the autocast dtype,
    output in that dtype, fp32 parameters receiving fp32 gradients equal to the cast version's."""
    fn, acts, params = _op_cases(device)[op]
    acts_lp = [a.to(dtype).requires_grad_() for a in acts]        # activations from a previous op
    params32 = [p.clone().requires_grad_() for p in params]
    with torch.autocast(device.type, dtype=dtype):
        out = fn(acts_lp, params32, backend=backend)
    assert out.dtype == dtype
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out.backward(gout)
    # the same, cast by hand, autocast off
    acts_m = [a.detach().clone().requires_grad_() for a in acts_lp]
    params_m = [p.detach().clone().requires_grad_() for p in params]
    expect = fn(acts_m, [p.to(dtype) for p in params_m], backend=backend)
    expect.backward(gout)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    for a, b in zip(acts_lp + params32, acts_m + params_m):
        assert a.grad.dtype == a.dtype
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_conv_layernorm_cpu_bf16_autocast_hf_case():
    """Issue 11's crash: fp32 weights, fp32 image under CPU bf16 autocast, auto backend."""
    x = torch.randn(1, 3, 32, 32)
    w, b, g, be = torch.randn(16, 3, 7, 7) * 0.1, torch.randn(16), torch.ones(16), torch.zeros(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, hw = conv_layernorm(x, w, b, g, be, 4, 3, 1e-6)
    assert out.dtype == torch.bfloat16 and hw == (8, 8)
    ref, _ = R.conv_layernorm(x.double(), w.double(), b.double(), g.double(), be.double(), 4, 3, 1e-6)
    assert (out.double() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_upsample_sum_cpu_under_autocast_runs_native_in_fp32_op():
    """The fp32-only native op, called inside a traced graph under autocast: fp32 inside, the
    autocast dtype out."""
    if not backends.native_cpu_available():
        pytest.skip("native CPU kernels did not build here")
    maps = [torch.randn(1, 30, 8).bfloat16(), torch.randn(1, 9, 8).bfloat16()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.segformer_fast.upsample_sum_cpu(maps, [5, 6, 3, 3], [5, 6], None, None, None, False)
    assert out.dtype == torch.bfloat16
    ref = R.upsample_sum([m.float() for m in maps], [(5, 6), (3, 3)], (5, 6))
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_custom_op_autocast_registration(device):
    """A forward custom op called directly (as a traced graph calls it) under autocast casts fp32
    parameters to the activations' autocast dtype."""
    from segformer_fast.ops import dwconv_gelu as _  # noqa: F401  (registers the op)
    x = torch.randn(1, 12, 16, device=device).bfloat16()
    w, b = torch.randn(16, 1, 3, 3, device=device), torch.randn(16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = torch.ops.segformer_fast.dwconv_gelu(x, 3, 4, w, b, "none")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, R.dwconv_gelu(x, (3, 4), w.bfloat16(), b.bfloat16()), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake (meta) kernels, autograd registration, dynamic shapes of every custom op

def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).to(device)
    q, k, v = r(1, 9, 16), r(1, 4, 16), r(1, 4, 16)
    o, lse = torch.ops.segformer_fast.sra_attention_fwd(q, k, v, 2, 0.25)
    x4, w, b, gw, gb = r(1, 8, 5, 6), r(12, 8, 3, 3), r(12), r(12), r(12)
    y = torch.ops.segformer_fast.conv_layernorm(x4, w, b, gw, gb, [2, 2], [1, 1], 1e-5)
    t, dw, db = r(1, 12, 16), r(16, 1, 3, 3), r(16)
    maps, hws, size = [r(1, 20, 8), r(1, 6, 8)], [4, 5, 2, 3], [4, 5]
    vec = [r(8), r(8).abs() + 0.5, r(8)]
    cases = {
        "sra_attention_fwd": (q, k, v, 2, 0.25),
        "sra_attention_bwd": (torch.randn_like(o), q, k, v, lse, 2, 0.25),
        "conv_layernorm": (x4, w, b, gw, gb, [2, 2], [1, 1], 1e-5),
        "conv_layernorm_backward": (torch.randn_like(y), x4, w, b, gw, [2, 2], [1, 1], 1e-5, True, True),
        "dwconv_gelu": (t, 3, 4, dw, db, "none"),
        "dwconv_gelu_backward": (torch.randn_like(t), t, 3, 4, dw, db, "tanh"),
        "upsample_sum": (maps, hws, size, *vec, True),
        "upsample_sum_epilogue_bwd": (r(1, 20, 8), maps, hws, size, *vec, True),
        "upsample_adjoint": (r(1, 20, 8), [2, 3], size, torch.float32),
        "resize_argmax": (r(2, 5, 4, 6), [7, 9], False, True),
    }
    if device.type == "cpu" and backends.native_cpu_available():
        cases["upsample_sum_cpu"] = (maps, hws, size, *vec, True)
        cases["resize_argmax_cpu"] = (r(2, 5, 4, 6), [3, 11], True, True)
        if torch.ops.segformer_fast.sra_attention_cpu and _has_bf16_dot():
            cases["sra_attention_cpu"] = (r(2, 9, 64).bfloat16(), r(2, 5, 64).bfloat16(), r(2, 5, 64).bfloat16(),
                                          2, 0.25)
    return cases


def _has_bf16_dot() -> bool:
    from segformer_fast.kernels.cpu import native
    return native().cpu_has_bf16_dot()


CUSTOM_OPS = ("sra_attention_fwd", "sra_attention_bwd", "conv_layernorm", "conv_layernorm_backward",
              "dwconv_gelu", "dwconv_gelu_backward", "upsample_sum", "upsample_sum_epilogue_bwd",
              "upsample_adjoint", "upsample_sum_cpu", "resize_argmax", "resize_argmax_cpu",
              "sra_attention_cpu")


def test_every_custom_op_is_checked():
    """The list below covers every op registered under segformer_fast:: by the ops layer."""
    import segformer_fast.ops  # noqa: F401
    ns = torch.ops.segformer_fast
    registered = {n for n in dir(ns) if isinstance(getattr(ns, n, None), torch._ops.OpOverloadPacket)}
    assert len(registered) >= 9
    ours = {n for n in registered if not n.startswith("cuda")}       # the CUDA helper's own ops
    assert ours <= set(CUSTOM_OPS), ours - set(CUSTOM_OPS)


@pytest.mark.parametrize("name", CUSTOM_OPS)
def test_opcheck(name, device):
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1" and not name.endswith("_cpu"):
        pytest.skip("triton custom ops on CPU tensors need the interpreter")
    cases = _opcheck_cases(device)
    if name not in cases:
        pytest.skip(f"{name} does not run on {device.type} here")
    args = cases[name]
    if name in ("sra_attention_fwd", "conv_layernorm", "dwconv_gelu", "upsample_sum"):
        def leaf(x):
            if isinstance(x, list):
                return [leaf(a) for a in x]
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                return x.clone().requires_grad_()
            return x
        args = tuple(leaf(x) for x in args)
    torch.library.opcheck(getattr(torch.ops.segformer_fast, name).default, args)
