"""dwconv_gelu (Mix-FFN core): Triton kernels under the interpreter, torch backend, input checks,
FusedMixFFN against NVlabs/seed/ours and HF modules, AOT compile stats, traffic model."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import segformer_fast.ops as sf_ops
from segformer_fast import reference
from segformer_fast.kernels.triton import dwconv_gelu as K
from segformer_fast.nn import FusedMixFFN
from segformer_fast.ops.dwconv_gelu import dwconv_gelu
from segformer_fast.testing import check_op, init_realistic_
from legacy_hf import run_legacy

# (B, H, W, C, approximate, input scale): the shapes plus 3x5x160 (two channel tiles).
CASES = {
    "11x19_c72_b2": (2, 11, 19, 72, "none", 1.0),
    "1x1": (1, 1, 1, 24, "none", 1.0),
    "9x1": (1, 9, 1, 24, "none", 1.0),
    "7x13_c100_large": (1, 7, 13, 100, "none", 30.0),
    "6x5_tanh": (1, 6, 5, 32, "tanh", 1.0),
    "3x5_c160": (1, 3, 5, 160, "none", 1.0),
}


def make_args(B, H, W, C, approximate, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, H * W, C, generator=g) * scale).requires_grad_()
    w = (torch.randn(C, 1, 3, 3, generator=g) / 3).requires_grad_()    # std 1/sqrt(9): trained scale
    b = (torch.randn(C, generator=g) * 0.2).requires_grad_()
    return [x, (H, W), w, b, approximate]


@pytest.fixture
def launches(monkeypatch):
    """Counts launcher calls (the ops layer looks the launchers up at call time)."""
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        real = getattr(K, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(K, name, counted)
    return calls


def _with(backend):
    return lambda x, hw, w, b, a: dwconv_gelu(x, hw, w, b, a, backend=backend)


@pytest.mark.parametrize("case", list(CASES))
def test_triton_contract(case, launches):
    args = make_args(*CASES[case])
    res = check_op(_with("triton"), reference.dwconv_gelu, args, torch.float32, backward=True,
                   name=f"triton {case}")
    assert launches == {"forward": 1, "backward": 1}
    main = case == "11x19_c72_b2"      # the main case also checks fp16 backward and bf16 I/O
    res += check_op(_with("triton"), reference.dwconv_gelu, args, torch.float16, backward=main,
                    name=f"triton {case}")
    assert launches["forward"] == 2
    if main:
        res += check_op(_with("triton"), reference.dwconv_gelu, args, torch.bfloat16, backward=False,
                        name=f"triton {case}")
    print(*res, sep="\n")


def test_triton_no_bias(launches):
    x, hw, w, b, a = make_args(1, 5, 7, 40, "none", 1.0)
    check_op(lambda x, hw, w: dwconv_gelu(x, hw, w, None, backend="triton"),
             lambda x, hw, w: reference.dwconv_gelu(x, hw, w, None), [x, hw, w], torch.float32)
    assert launches == {"forward": 1, "backward": 1}


def test_backward_partials_deterministic():
    """The backward-conv kernel's strided multi-tile loop (forced with few partial rows) gives
    the same dw/db as one tile per program, and repeated runs are bitwise equal."""
    B, H, W, C = 2, 5, 9, 40
    x, _, w, b, _ = make_args(B, H, W, C, "none", 1.0)
    x, w, b = x.detach(), w.detach(), b.detach()
    dy = torch.randn(B, H * W, C)
    one = K.backward(dy, x, H, W, w, b, "none", partial_rows=1000)
    looped = K.backward(dy, x, H, W, w, b, "none", partial_rows=3)
    again = K.backward(dy, x, H, W, w, b, "none", partial_rows=3)
    torch.testing.assert_close(looped[0], one[0], rtol=0, atol=0)      # dx does not depend on it
    for a, c in zip(looped[1:], one[1:]):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-5)
    for a, c in zip(looped, again):
        assert torch.equal(a, c)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_contract(case):
    args = make_args(*CASES[case])
    check_op(_with("torch"), reference.dwconv_gelu, args, torch.float32, backward=True, name=f"torch {case}")
    check_op(_with("torch"), reference.dwconv_gelu, args, torch.float16, backward=False, name=f"torch {case}")


def test_torch_backend_copies_nothing(monkeypatch):
    """The conv reads the tokens through a view and its channels-last output IS the result."""
    import torch.nn.functional as F
    seen = {}
    real = F.conv2d

    def spy(inp, *a, **k):
        out = real(inp, *a, **k)
        seen.update(in_ptr=inp.data_ptr(), out_ptr=out.data_ptr(),
                    out_cl=out.is_contiguous(memory_format=torch.channels_last))
        return out
    monkeypatch.setattr(F, "conv2d", spy)
    x, hw, w, b, a = make_args(2, 12, 10, 64, "none", 1.0)
    with torch.no_grad():
        y = dwconv_gelu(x, hw, w, b, backend="torch")
    assert seen["in_ptr"] == x.data_ptr()
    assert seen["out_cl"] and seen["out_ptr"] == y.data_ptr() and y.is_contiguous()
    y2 = dwconv_gelu(x, hw, w, b, backend="torch")          # autograd path: out-of-place GELU
    assert y2.is_contiguous() and y2.requires_grad


def test_public_name_is_callable():
    x, hw, w, b, a = make_args(1, 3, 4, 8, "none", 1.0)
    torch.testing.assert_close(sf_ops.dwconv_gelu(x, hw, w, b, backend="reference"),
                               reference.dwconv_gelu(x, hw, w, b))


def _bad_inputs():
    x = torch.randn(2, 12, 16)
    w = torch.randn(16, 1, 3, 3)
    b = torch.randn(16)
    return {
        "N!=H*W": ((x, (3, 5), w, b, "none"), ValueError, "H\\*W=15"),
        "weight shape": ((x, (3, 4), torch.randn(16, 3, 3), b, "none"), ValueError, "weight must be"),
        "weight 5x5": ((x, (3, 4), torch.randn(16, 1, 5, 5), b, "none"), ValueError, "weight must be"),
        "bias shape": ((x, (3, 4), w, torch.randn(15), "none"), ValueError, "bias must be"),
        "dtype": ((x, (3, 4), w.half(), b, "none"), TypeError, "dtype"),
        "int x": ((x.int(), (3, 4), w, b, "none"), TypeError, "floating"),
        "device": ((x, (3, 4), w.to("meta"), b, "none"), ValueError, "meta"),
        "approximate": ((x, (3, 4), w, b, "sigmoid"), ValueError, "approximate"),
        "x 4d": ((x.view(2, 3, 4, 16), (3, 4), w, b, "none"), ValueError, "tokens"),
        "hw": ((x, 12, w, b, "none"), TypeError, "hw"),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_bad_inputs_raise_before_launch(name, launches):
    args, exc, msg = _bad_inputs()[name]
    with pytest.raises(exc, match=msg):
        dwconv_gelu(*args, backend="triton")
    assert launches == {"forward": 0, "backward": 0}


# ---------------------------------------------------------------------------------------------
# FusedMixFFN

def _seed_mlp_class():
    doc = Path(__file__).resolve().parents[2] / "shared" / "seed" / "segformer-explainer.md"
    if not doc.is_file():
        return None
    blocks = re.findall(r"~~~python\n(.*?)~~~", doc.read_text(encoding="utf-8"), flags=re.S)
    code = blocks[-1].split("if __name__ == '__main__':")[0]
    mod = types.ModuleType("seed_last_block")
    exec(compile(code, str(doc), "exec"), mod.__dict__)
    return mod.MLP


def _ours(approximate="none"):
    from segformer_fast.models.segformer import MixFFN
    return MixFFN(24, 96, drop=0.0, approximate=approximate)


def _hf(act):
    from transformers import SegformerConfig
    from transformers.models.segformer.modeling_segformer import SegformerMixMLP
    return SegformerMixMLP(SegformerConfig(hidden_act=act), in_features=24, hidden_features=96)


def _compare_module(src, backend, H=5, W=7, B=2):
    src = init_realistic_(src, seed=2).train()       # dropout p=0 in these: train == eval numerics
    fused = FusedMixFFN.from_module(src, backend=backend)
    assert list(fused.state_dict()) == list(src.state_dict())
    assert {id(p) for p in fused.parameters()} == {id(p) for p in src.parameters()}
    x = torch.randn(B, H * W, src.state_dict()[next(iter(src.state_dict()))].shape[1])
    outs, grads = [], []
    for m in (src, fused):
        m.zero_grad()
        y = m(x, H, W)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4 * outs[0].abs().max().item())
    for n in grads[0]:
        scale = grads[0][n].abs().max().item()
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-4 * scale)
    return fused


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mixffn_ours(approximate):
    f = _compare_module(_ours(approximate), "torch")
    assert f.approximate == approximate and f.layout.name == "nvlabs"


def test_mixffn_ours_triton(launches):
    _compare_module(_ours(), "triton", H=3, W=4, B=1)
    assert launches == {"forward": 1, "backward": 1}


def test_mixffn_seed():
    cls = _seed_mlp_class()
    if cls is None:
        pytest.skip("seed document not present")
    f = _compare_module(cls(24, 96), "torch")
    assert f.layout.name == "seed" and f.approximate == "none"


@pytest.mark.parametrize("act,kind", [("gelu", "none"), ("gelu_new", "tanh"), ("gelu_pytorch_tanh", "tanh")])
def test_mixffn_hf(act, kind):
    f = _compare_module(_hf(act), "torch")
    assert f.layout.name == "hf>=5.9" and f.approximate == kind


@pytest.mark.parametrize("act", ["relu", "quick_gelu"])
def test_mixffn_refuses_other_activations(act):
    with pytest.raises(ValueError, match="cannot reproduce activation"):
        FusedMixFFN.from_module(_hf(act))


def test_mixffn_dropout_semantics():
    """The same Dropout module (p read from it, train/eval from it) runs at the same two places
    (after the activation, after fc2). RNG draws are not compared element-wise: the source's
    dropout mask follows its NCHW-strided activation's memory order, ours the tokens'."""
    src = _ours()
    src.drop.p = 0.5
    fused = FusedMixFFN.from_module(src, backend="torch")
    x = torch.randn(1, 12, 24)
    fused.eval()
    torch.testing.assert_close(fused(x, 3, 4), src.eval()(x, 3, 4))
    inputs = {"src": [], "fused": []}
    for key, m in (("src", src), ("fused", fused)):
        h = m.drop.register_forward_hook(lambda mod, inp, out, key=key: inputs[key].append(inp[0].shape))
        m.train()
        y = m(x, 3, 4)
        h.remove()
    assert inputs["fused"] == inputs["src"] == [torch.Size([1, 12, 96]), torch.Size([1, 12, 24])]
    assert (y == 0).float().mean() > 0.2              # dropout active in training


HF_LEGACY_SCRIPT = r"""
import torch, transformers
from transformers import SegformerConfig
from transformers.models.segformer.modeling_segformer import SegformerMixFFN
from segformer_fast.nn import FusedMixFFN
from segformer_fast.testing import init_realistic_
assert int(transformers.__version__.split('.')[0]) < 5, transformers.__version__
for act, kind in (("gelu", "none"), ("gelu_new", "tanh")):
    m = init_realistic_(SegformerMixFFN(SegformerConfig(hidden_act=act), 24, 96), seed=1)
    f = FusedMixFFN.from_module(m, backend="torch")
    assert f.layout.name == "hf<=5.8" and f.approximate == kind, (f.layout, f.approximate)
    assert list(f.state_dict()) == list(m.state_dict())
    x = torch.randn(2, 35, 24)
    a, b = m(x, 5, 7), f(x, 5, 7)
    ga = torch.autograd.grad(a.square().sum(), m.dense1.weight)[0]
    gb = torch.autograd.grad(b.square().sum(), m.dense1.weight)[0]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-4 * ga.abs().max().item())
print('legacy', transformers.__version__, 'ok')
"""


def test_mixffn_hf_legacy_layout():
    run_legacy(HF_LEGACY_SCRIPT)


def test_mixffn_unknown_layout():
    with pytest.raises(ValueError, match="no known Mix-FFN layout"):
        FusedMixFFN.from_module(nn.Linear(3, 3))


# ---------------------------------------------------------------------------------------------
# torch.compile, AOT, traffic model

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend, launches):
    """Traces without a graph break (the triton path through the custom op + register_fake).
    aot_eager, not inductor: inductor's first CPU compile takes ~45 s on this 2-core machine."""
    x, hw, w, b, a = make_args(1, 4, 5, 16, "none", 1.0)
    fn = torch.compile(lambda x, w, b: dwconv_gelu(x, (4, 5), w, b, backend=backend),
                       fullgraph=True, backend="aot_eager")
    y = fn(x, w, b)
    y.square().sum().backward()
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    yr = reference.dwconv_gelu(xr, hw, wr, br)
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr)
    for t, r in ((x, xr), (w, wr), (b, br)):
        torch.testing.assert_close(t.grad, r.grad, rtol=1e-4, atol=1e-5)
    if backend == "triton":
        assert launches["forward"] >= 1 and launches["backward"] >= 1


def test_triton_non_contiguous_input(launches):
    """Tokens given as a strided view (e.g. the NCHW map's flatten(2).transpose(1, 2))."""
    B, H, W, C = 1, 4, 6, 24
    nchw = torch.randn(B, C, H, W)
    x = nchw.flatten(2).transpose(1, 2)
    assert not x.is_contiguous()
    _, _, w, b, _ = make_args(B, H, W, C, "none", 1.0)
    with torch.no_grad():
        torch.testing.assert_close(dwconv_gelu(x, (H, W), w, b, backend="triton"),
                                   reference.dwconv_gelu(x, (H, W), w, b), rtol=1e-5, atol=1e-5)
    assert launches["forward"] == 1


def test_custom_op_registrations():
    """Fake (meta) kernels and autograd registration of the Triton custom ops (opcheck runs the
    real op under the interpreter on a tiny map)."""
    from segformer_fast.ops.dwconv_gelu import _dwconv_gelu_op
    x, hw, w, b, a = make_args(1, 2, 3, 16, "none", 1.0)
    torch.library.opcheck(_dwconv_gelu_op, (x, 2, 3, w, b, "none"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_aot_compile_sm80_sm90():
    """Every kernel variant used at real hidden sizes (C 128...2048, fp16/fp32, erf/tanh GELU),
    compiled for sm_80 and sm_90 with run-time divisibility hints (in a subprocess: the
    interpreter's functions cannot be lowered)."""
    import json
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-m", "segformer_fast.kernels.triton.dwconv_gelu"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    print("\nkernel | constexprs | x dtype | arch | warps | regs | spills | smem")
    for row in rows:
        print(" | ".join(str(v) for v in row))
    assert len(rows) == 2 * len({(k, c, t) for k, c, t, *_ in rows})
    for kernel, ce, ty, arch, nw, regs, spills, smem in rows:
        assert spills == 0, row
        assert smem <= 100 * 1024, row


def test_traffic_model():
    from segformer_fast.analysis.dwconv_gelu import dwconv_gelu_cost
    for C, H in ((128, 128), (256, 64), (640, 32), (1024, 16), (2048, 16)):   # 512² B0/B2 stages
        fwd = dwconv_gelu_cost(1, H, H, C, 2)
        both = dwconv_gelu_cost(1, H, H, C, 2, backward=True)
        assert fwd["fused"].bytes < fwd["reference"].bytes
        assert both["fused"].bytes < both["reference"].bytes
        assert 3.5 < fwd["bytes_ratio"] <= 4.0                    # 6 passes + copies vs 1 pass
        assert fwd["fused"].flops == fwd["reference"].flops > 0
        # without layout copies the reference is still two passes (conv, GELU)
        assert dwconv_gelu_cost(1, H, H, C, 2, layout_copies=0)["bytes_ratio"] > 1.9
