"""The cost models of ``segformer_fast.analysis`` against what PyTorch really does, measured
independently of the models' own formulas:

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` counts the matmul/conv FLOPs of the reference
  op sequence (forward and backward); the model's reference FLOPs must cover them and exceed them
  by at most the elementwise work (bias, GELU, LayerNorm, softmax: a few dozen FLOPs per element).
- Bytes: every byte the reference sequence allocates is written at least once, so the model's
  reference traffic must be at least the bytes really allocated (recorded by a dispatch mode); the
  fused kernel must read each input and write each output once, so its modelled traffic must be at
  least their size.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from segformer_fast import reference as R


class _Allocated(TorchDispatchMode):
    """Sums the bytes of every tensor an op sequence produces."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, int] = {}
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in args:                           # storages that existed before the op are inputs
            if isinstance(a, torch.Tensor):
                self.seen.add(a.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.seen:         # a new storage (views and _unsafe_view share one)
                    self.seen.add(ptr)
                    self.storages[ptr] = t.untyped_storage().nbytes()
        return out

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def _measure(fn, inputs, backward):
    """(matmul/conv FLOPs, bytes allocated) of ``fn(*inputs)`` (+ its backward)."""
    with FlopCounterMode(display=False) as flops, _Allocated() as alloc:
        out = fn(*inputs)
        if backward:
            out.backward(torch.ones_like(out))
    return flops.get_total_flops(), alloc.bytes


def _leaves(*shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _check(model: dict, counted_flops: int, allocated: int, io_bytes: int, elements: int,
           per_element: float):
    ref, fused = model["reference"], model["fused"]
    print(f"\n{ref}\n{fused}\ncounted {counted_flops} FLOP, allocated {allocated / 1e6:.2f} MB")
    if counted_flops is not None:
        assert counted_flops > 0
        assert counted_flops <= ref.flops <= counted_flops + per_element * elements, (ref.flops, counted_flops)
    assert ref.bytes >= allocated, (ref.bytes, allocated)
    assert fused.bytes >= io_bytes, (fused.bytes, io_bytes)
    assert fused.bytes < ref.bytes


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_dwconv_gelu_cost(backward):
    from segformer_fast.analysis.dwconv_gelu import dwconv_gelu_cost
    B, H, W, C = 1, 32, 24, 64
    x, w, b = _leaves((B, H * W, C), (C, 1, 3, 3), (C,))
    flops, alloc = _measure(lambda x, w, b: R.dwconv_gelu(x, (H, W), w, b), (x, w, b), backward)
    E = B * H * W * C
    io = (2 + 2 * backward) * E * 4          # x in, y out (+ dy in, dx out)
    # FlopCounterMode's convolution-backward formula ignores groups (it counts a depthwise conv's
    # backward as dense), so only the forward FLOPs are compared here
    _check(dwconv_gelu_cost(B, H, W, C, 4, backward=backward), None if backward else flops, alloc, io, E,
           40 * (1 + backward))


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("Cin,H,Cout,k,s,p,tokens", [(3, 64, 32, 7, 4, 3, False), (32, 32, 64, 3, 2, 1, True),
                                                   (32, 32, 32, 8, 8, 0, True)],
                         ids=["stem", "embed", "sr8"])
def test_conv_layernorm_cost(Cin, H, Cout, k, s, p, tokens, backward):
    from segformer_fast.analysis.conv_layernorm import conv_layernorm_cost
    x, w, b, g, be = _leaves((1, Cin, H, H), (Cout, Cin, k, k), (Cout,), (Cout,), (Cout,))

    def fn(x, w, b, g, be):
        return R.conv_layernorm(x, w, b, g, be, s, p, 1e-5)[0]
    flops, alloc = _measure(fn, (x, w, b, g, be), backward)
    Ho = (H + 2 * p - k) // s + 1
    E_out = Ho * Ho * Cout
    io = (x.numel() + E_out) * 4 * (1 + backward)
    _check(conv_layernorm_cost(1, Cin, H, H, Cout, k, s, p, torch.float32, tokens, backward=backward),
           flops, alloc, io, E_out, 40 * (1 + backward))


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_sra_attention_cost(backward):
    from segformer_fast.analysis.sra_attention import sra_attention_cost
    B, N, M, C, heads = 1, 1024, 256, 64, 2
    q, k, v = _leaves((B, N, C), (B, M, C), (B, M, C))
    flops, alloc = _measure(lambda q, k, v: R.sra_attention(q, k, v, heads), (q, k, v), backward)
    io = (2 * B * N * C + 2 * B * M * C) * 4 * (1 + backward)
    _check(sra_attention_cost(B, N, M, C, heads, torch.float32, backward=backward), flops, alloc, io,
           B * heads * N * M, 20 * (1 + backward))
