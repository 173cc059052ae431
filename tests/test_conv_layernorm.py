"""conv + LayerNorm (patch embedding, sequence reduction): Triton kernels under the interpreter,
the torch backend, input checks, drop-in modules, torch.compile, AOT compile stats, cost model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
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
IDS = [c[0] for c in CASES]


def make_args(B, Cin, H, W, Cout, k, stride, padding, tokens, eps, scale=1.0, bias=True, affine=True, seed=0):
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
    ts = [None if t is None else t.detach().clone().requires_grad_() for t in ts]
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


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_fp32_forward_backward(case, launches):
    args = make_args(*case[1:])
    _report(check_op(_op("triton"), R.conv_layernorm, args, torch.float32, name=f"triton {case[0]}"))
    assert launches["fwd"] >= 1 and launches["bwd"] >= 1, launches


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_low_precision_forward(case, dtype, launches):
    args = make_args(*case[1:])
    _report(check_op(_op("triton"), R.conv_layernorm, args, dtype, backward=False, name=f"triton {case[0]}"))
    assert launches["fwd"] >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_large_magnitude(dtype, launches):
    # inputs of magnitude ~300 (conv outputs ~1e2..1e3: fp16-safe, LayerNorm must cancel the scale)
    args = make_args(2, 40, 23, 31, 72, 3, 2, 1, True, 1e-6, scale=300.0, seed=3)
    _report(check_op(_op("triton"), R.conv_layernorm, args, dtype, backward=dtype == torch.float32,
                     name="triton large"))
    assert launches["fwd"] >= 1


def test_triton_without_bias_and_affine(launches):
    args = make_args(1, 24, 11, 13, 40, 3, 2, 1, True, 1e-5, bias=False, affine=False)
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


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_backend_contract(case, launches):
    args = make_args(*case[1:])
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
# drop-in modules

class _MMSegPatchEmbed(nn.Module):
    """mmseg 1.x PatchEmbed's shape: `projection` conv + `norm`, returns (tokens, (H, W))."""

    def __init__(self, cin, cout, k, s, p):
        super().__init__()
        self.adap_padding = None          # mmseg names it so; set only for padding="corner"
        self.projection = nn.Conv2d(cin, cout, k, s, p)
        self.norm = nn.LayerNorm(cout, eps=1e-6)

    def forward(self, x):
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


def _patch_modules():
    from segformer_fast.models.segformer import OverlapPatchEmbed
    mods = [("nvlabs", OverlapPatchEmbed(3, 32, 7, 4), "image"),
            ("nvlabs_k3", OverlapPatchEmbed(16, 24, 3, 2, eps=1e-6), "image"),
            ("mmseg", _MMSegPatchEmbed(3, 16, 7, 4, 3), "image")]
    try:
        from transformers.models.segformer import modeling_segformer as hf
        mods.append(("hf", hf.SegformerOverlapPatchEmbeddings(3, 4, 3, 32), "image"))
        if hasattr(hf, "SegformerSequenceReduction"):
            mods.append(("hf_sr", hf.SegformerSequenceReduction(16, 4), "sr"))
    except ImportError:
        pass
    return mods


def _compare_modules(m, fused, kind, backend):
    cin = getattr(fused, fused._conv_name).in_channels
    x = torch.randn(2, cin, 13, 10) if kind == "sr" else torch.randn(2, cin, 29, 22)
    if kind == "sr":
        x = x.flatten(2).transpose(1, 2).contiguous()
        call = lambda mod: mod(x, 13, 10)
    else:
        call = lambda mod: mod(x)
    outs = []
    for mod in (m, fused):
        mod.zero_grad()
        out = call(mod)
        first = out if isinstance(out, torch.Tensor) else out[0]
        (first * torch.linspace(-1, 1, first.shape[-1])).square().sum().backward()
        outs.append((out, {n: p.grad.clone() for n, p in mod.named_parameters()}))
    (o_ref, g_ref), (o_new, g_new) = outs
    if isinstance(o_ref, torch.Tensor):
        torch.testing.assert_close(o_new, o_ref, rtol=1e-4, atol=1e-4)
    else:
        assert len(o_new) == len(o_ref) and o_new[1:] == o_ref[1:]   # same H, W convention
        torch.testing.assert_close(o_new[0], o_ref[0], rtol=1e-4, atol=1e-4)
    assert g_new.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_new[n], g_ref[n], rtol=1e-4, atol=1e-4, msg=n)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,m,kind", _patch_modules(), ids=[c[0] for c in _patch_modules()])
def test_drop_in_modules(name, m, kind, backend, launches):
    from segformer_fast.nn.patch_embed import FusedOverlapPatchEmbed, FusedSequenceReduction
    init_realistic_(m)
    cls = FusedSequenceReduction if kind == "sr" else FusedOverlapPatchEmbed
    fused = cls.from_module(m, backend=backend)
    assert list(fused.state_dict()) == list(m.state_dict())
    assert {id(p) for p in fused.parameters()} == {id(p) for p in m.parameters()}
    _compare_modules(m, fused, kind, backend)
    if backend == "triton":
        assert launches["fwd"] >= 1 and launches["bwd"] >= 1


def test_drop_in_reads_eps_and_rejects_unsupported():
    from segformer_fast.nn import FusedOverlapPatchEmbed
    from segformer_fast.models.segformer import OverlapPatchEmbed
    m = OverlapPatchEmbed(3, 8, 3, 2, eps=1e-6)
    assert FusedOverlapPatchEmbed.from_module(m)._run.__self__.norm.eps == 1e-6
    m.proj = nn.Conv2d(3, 8, 3, 2, 1, groups=1, dilation=2)
    with pytest.raises(ValueError, match="dilation"):
        FusedOverlapPatchEmbed.from_module(m)
    with pytest.raises(ValueError, match="conv/LayerNorm"):
        FusedOverlapPatchEmbed.from_module(nn.Linear(3, 3))


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


# ----------------------------------------------------------------------------------------------
# ahead-of-time compilation at SegFormer's real shapes: every (kernel, config) that runs

# (Cout, Cin, k, tokens): stem k7 (image, B0/B1+), stage 2-4 k3 embeddings, sr 8/4/2 reductions
REAL = [(32, 3, 7, False), (64, 3, 7, False),
        (64, 32, 3, True), (128, 64, 3, True), (160, 64, 3, True), (320, 128, 3, True),
        (256, 160, 3, True), (512, 320, 3, True),
        (32, 32, 8, True), (64, 64, 8, True), (128, 128, 4, True)]


def _aot_jobs():
    seen, jobs = set(), []
    for cout, cin, k, tokens in REAL:
        K_ = cin * k * k
        for dtype in (torch.float32, torch.bfloat16):
            cfg = K.launch_config(cout, K_, dtype, interpret=False)
            key = (tokens, dtype, tuple(sorted(cfg.items())))
            if key in seen:
                continue
            seen.add(key)
            # 16-divisible at the real shapes: H, W, H', W' (512/1024 inputs), Cout, K unless the
            # 3-channel stem; strides of tokens (C multiple of 16) / of the image (H*W, W)
            div = ("H", "W", "Ho", "Wo", "sxb", "sxh") + (("Cin", "Cout", "K", "sxw") if tokens else ("sxc", "Cout"))
            for kernel in ("fwd", "bwd"):
                for arch in (80, 90):
                    jobs.append((kernel, dtype, cout, K_, tokens, div, arch))
    return jobs


def test_aot_compile_every_config():
    """sm_80 + sm_90 compile of every (kernel, dtype, config) that runs at SegFormer's shapes, in a
    subprocess without the interpreter (the interpreter's @triton.jit functions cannot be lowered)."""
    jobs = [dict(kernel=kernel, dtype=str(dtype)[6:], cout=cout, k=K_, tokens=tokens, divisible=list(div), arch=arch)
            for kernel, dtype, cout, K_, tokens, div, arch in _aot_jobs()]
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "segformer_fast.kernels.triton.conv_layernorm"],
                          input=json.dumps(jobs), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{'kernel':20} {'dtype':9} {'layout':6} {'Cout':>4} {'config':24} arch regs spill smem")
    for job, r in zip(jobs, results):
        c = r["constexprs"]
        cfg = f"M{c['BLOCK_M']} N{c['BLOCK_N']} K{c['BLOCK_K']} w{r['num_warps']} s{r['num_stages']}"
        print(f"{r['kernel']:20} {job['dtype']:9} {'tokens' if job['tokens'] else 'image':6} {job['cout']:4} "
              f"{cfg:24} sm_{r['arch']} {r['registers']:4} {r['spills']:5} {r['shared_bytes']}")
    assert len(results) == len(jobs)
    for job, r in zip(jobs, results):
        assert r["spills"] == 0, (job, r)
        assert r["shared_bytes"] <= 100 * 1024, (job, r)


def test_cost_model_sane():
    from segformer_fast.analysis.conv_layernorm import conv_layernorm_cost
    # B0 at 512^2: stem, stage-2 embedding, stage-1 sequence reduction (sr 8, token input)
    for args in [(1, 3, 512, 512, 32, 7, 4, 3, torch.float16, False),
                 (1, 32, 128, 128, 64, 3, 2, 1, torch.float16, True),
                 (1, 32, 128, 128, 32, 8, 8, 0, torch.float16, True)]:
        for backward in (False, True):
            c = conv_layernorm_cost(*args, backward=backward)
            print(c["reference"], "|", c["fused"], f"| bytes x{c['bytes_ratio']:.2f}")
            assert c["fused"].bytes < c["reference"].bytes
            assert c["roofline_speedup"] >= 1.0
            assert c["fused"].flops >= c["reference"].flops > 0


def test_mmseg_adaptive_padding_is_refused():
    from segformer_fast.nn import FusedOverlapPatchEmbed

    m = _MMSegPatchEmbed(3, 16, 7, 4, 3)
    m.adap_padding = nn.ZeroPad2d(1)        # stand-in for mmseg's AdaptivePadding module
    with pytest.raises(ValueError, match="adaptive padding"):
        FusedOverlapPatchEmbed.from_module(m)
