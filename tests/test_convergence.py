"""Training convergence (Liger-Kernel's convergence tests are the model): a tiny Hugging Face
SegFormer trained 25 steps on synthetic data from the same seed, stock vs patched through the public
API (``segformer_fast.patch(model, backend="torch")``): the loss curves must agree step by step.

Tolerance: fp32 throughout, and the patched model reorders sums (the folded decoder, fused
LayerNorm/attention compositions), so single steps differ by rounding that the optimiser carries
forward. Each step's loss must be within 1e-3 relative of stock, the trained models' logits within
1e-2 of their scale (25 Adam steps carry the rounding differences into the weights: measured
~1.5e-3), and the loss must really fall (the test would otherwise pass on two broken models).
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

STEPS = 25
LOSS_RTOL = 1e-3


def _tiny_segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    cfg = SegformerConfig(num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1],
                          hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2], mlp_ratios=[4, 4, 4, 4],
                          decoder_hidden_size=32, num_labels=5, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0, drop_path_rate=0.0)
    torch.manual_seed(0)
    return SegformerForSemanticSegmentation(cfg)


def _data(steps, batch=2, size=64, classes=5):
    """Learnable synthetic segmentation: the label is which colour channel band dominates."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size, generator=g)
        smooth = torch.nn.functional.avg_pool2d(x, 9, 1, 4)
        labels = (smooth.sum(1) * 4).clamp(-2, 2).add(2).round().long().clamp(0, classes - 1)
        yield x, labels


def _train(model):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for x, y in _data(STEPS):
        loss = model(pixel_values=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_patched_trains_like_stock():
    import segformer_fast
    stock = _tiny_segformer()
    patched = copy.deepcopy(stock)
    report = segformer_fast.patch(patched, backend="torch")
    assert report.replaced, "patch replaced nothing: the comparison would be stock vs stock"
    a, b = _train(stock), _train(patched)
    for step, (la, lb) in enumerate(zip(a, b)):
        assert abs(la - lb) <= LOSS_RTOL * abs(la), f"step {step}: stock {la:.6f} patched {lb:.6f}"
    print(f"\nloss stock {a[0]:.4f} -> {a[-1]:.4f}, patched {b[0]:.4f} -> {b[-1]:.4f}, "
          f"max rel diff {max(abs(x - y) / abs(x) for x, y in zip(a, b)):.2e}")
    assert a[-1] < 0.8 * a[0], "the loss did not fall: the task is not being learned"
    x, _ = next(_data(1))
    stock.eval(), patched.eval()
    with torch.no_grad():
        la, lb = stock(pixel_values=x).logits, patched(pixel_values=x).logits
    assert (la - lb).abs().max() <= 1e-2 * la.abs().max()
