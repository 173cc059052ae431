"""A whole patched SegFormer on ``backend="cuda"``: every fused op through the CUDA C++ kernels,
here through the emulation of the CUDA execution model (SEGFORMER_FAST_CUDA_EMULATE=1), at tiny
sizes; on a GPU machine the same test runs the nvcc build on CUDA tensors."""
import copy

import pytest
import torch

import segformer_fast
from segformer_fast.testing import init_realistic_

from cuda_testing import emu  # noqa: F401  (fixture: the emulated build, env var set)

transformers = pytest.importorskip("transformers")
from transformers import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402

TINY = dict(hidden_sizes=[16, 32, 40, 64], num_attention_heads=[1, 2, 2, 4], depths=[1, 1, 1, 1],
            decoder_hidden_size=24, num_labels=5)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_patched_tiny_hf_on_cuda_matches_stock(emu, device):  # noqa: F811
    torch.manual_seed(0)
    stock = init_realistic_(SegformerForSemanticSegmentation(SegformerConfig(**TINY)), seed=2)
    stock = stock.to(device).eval()
    patched = copy.deepcopy(stock)
    # pinned to "cuda": an op the CUDA kernels could not run would raise, never fall back
    report = segformer_fast.patch(patched, backend="cuda")
    assert len(report.replaced) == 13 and not report.skipped, str(report)
    x = torch.randn(2, 3, 67, 45, device=device)
    with torch.no_grad():
        a, b = stock(pixel_values=x).logits, patched(pixel_values=x).logits
    assert rel(b, a) <= 1e-4, rel(b, a)
    patched.train(), stock.train()
    grads = []
    for m in (stock, patched):
        torch.manual_seed(3)                       # same DropPath / dropout draws
        out = m(pixel_values=x).logits
        (out * torch.linspace(-1, 1, out.numel(), device=device).view(out.shape)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert rel(grads[1], grads[0]) <= 1e-3, rel(grads[1], grads[0])
