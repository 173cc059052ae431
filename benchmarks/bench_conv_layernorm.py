"""conv + LayerNorm at SegFormer's real shapes: fused op vs reference vs stock alternatives.

impls: "op" = segformer_fast.ops.conv_layernorm (torch backend on CPU, triton on CUDA),
"reference" = conv2d -> flatten/transpose -> layer_norm, "channels_last" = the stock alternative
(channels-last conv + layer_norm on the token view). CPU: 512^2 B0 only; 1024^2 and B2 need CUDA.
"""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from segformer_fast import reference as R
from segformer_fast.ops.conv_layernorm import conv_layernorm

# (name, res, Cin, Cout, k, stride, padding, token input)
SHAPES = [
    ("b0_stem", 512, 3, 32, 7, 4, 3, False),
    ("b0_embed2", 512, 32, 64, 3, 2, 1, True),
    ("b0_sr8", 512, 32, 32, 8, 8, 0, True),
    ("b2_stem", 512, 3, 64, 7, 4, 3, False),
    ("b2_sr8", 512, 64, 64, 8, 8, 0, True),
    ("b0_stem_1024", 1024, 3, 32, 7, 4, 3, False),
    ("b2_embed2_1024", 1024, 64, 128, 3, 2, 1, True),
    ("b2_sr4_1024", 1024, 128, 128, 4, 4, 0, True),
]
CPU_OK = {"b0_stem", "b0_embed2", "b0_sr8"}


def _inputs(res, cin, cout, k, tokens, device, dtype, grad):
    # stem sees the image; later convs see tokens at the stage resolution (H/4 for stage 1 maps)
    H = res if not tokens else res // 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, H, H, generator=g)
    if tokens:
        x = x.flatten(2).transpose(1, 2).contiguous()
    w = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
    ts = [x, w, torch.randn(cout, generator=g) * 0.2, torch.randn(cout, generator=g) * 0.3 + 1,
          torch.randn(cout, generator=g) * 0.2]
    ts = [t.to(device, dtype).requires_grad_(grad) for t in ts]
    return ts, (H, H) if tokens else None


def _channels_last(x, w, b, g, beta, s, p, eps, hw):
    if x.dim() == 3:
        B, N, C = x.shape
        x = x.view(B, hw[0], hw[1], C).permute(0, 3, 1, 2)
    else:
        x = x.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x, w, b, s, p)
    B, C, Ho, Wo = y.shape
    return F.layer_norm(y.permute(0, 2, 3, 1).reshape(B, Ho * Wo, C), (C,), g, beta, eps)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["op", "reference", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_conv_layernorm(benchmark, shape, impl, mode):
    name, res, cin, cout, k, s, p, tokens = shape
    cuda = torch.cuda.is_available()
    if not cuda and name not in CPU_OK:
        pytest.skip("CUDA-only shape (CPU: 512^2 B0 only)")
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    grad = mode == "fwd_bwd"
    (x, w, b, g, beta), hw = _inputs(res, cin, cout, k, tokens, device, dtype, grad)
    eps = 1e-5
    if impl == "op":
        fn = lambda: conv_layernorm(x, w, b, g, beta, s, p, eps, hw)[0]   # backend auto
    elif impl == "reference":
        fn = lambda: R.conv_layernorm(x, w, b, g, beta, s, p, eps, hw)[0]
    else:
        fn = lambda: _channels_last(x, w, b, g, beta, s, p, eps, hw)
    gout = None

    def run():
        nonlocal gout
        y = fn()
        if grad:
            if gout is None:
                gout = torch.randn_like(y)
            y.backward(gout)
        if cuda:
            torch.cuda.synchronize()
        return y

    benchmark.extra_info.update(dict(
        device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        torch=torch.__version__, dtype=str(dtype), shape=name, res=res, cin=cin, cout=cout, k=k,
        stride=s, padding=p, tokens=tokens, threads=torch.get_num_threads()))
    run()                          # warm-up (Triton compile on CUDA)
    benchmark(run)
