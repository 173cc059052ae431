"""The native CPU resize_argmax (csrc/cpu/resize_argmax.cpp): bit for bit the torch composition
(labels and scores), stock labels except counted near-ties, AVX-512 and portable paths identical,
tiles of rows and columns (sizes above one 16 x 128 tile, ragged edges), exact ties and NaN."""
from __future__ import annotations


import pytest
import torch

from segformer_fast import backends
from segformer_fast.ops import resize_argmax
from test_resize_argmax import CASES, compare, logits_for, nan_wins, same_bits_as_torch

pytestmark = pytest.mark.skipif(not backends.native_cpu_available(), reason="native CPU kernels did not build")

TILED = [((2, 6, 40, 70), (150, 261), False), ((1, 11, 90, 33), (37, 140), True)]


@pytest.mark.parametrize("case", CASES + TILED, ids=lambda c: f"{c[0]}->{c[1]}{'-ac' if c[2] else ''}")
def test_same_bits_as_torch_and_stock_labels(case):
    same_bits_as_torch("cpu", case, seed=1)


def test_portable_path_is_bit_identical(monkeypatch):
    x = logits_for((2, 19, 33, 41), seed=3)
    fast = resize_argmax(x, (131, 165), return_scores=True, backend="cpu")
    monkeypatch.setenv("SEGFORMER_FAST_CPU_ISA", "portable")
    slow = resize_argmax(x, (131, 165), return_scores=True, backend="cpu")
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_segformer_sized_150_classes():
    """150 classes, 32x48 -> 128x192 (4x): near-ties are rare and all within rounding."""
    x = logits_for((1, 150, 32, 48), seed=4)
    labels = resize_argmax(x, (128, 192), backend="cpu")
    ties = compare(labels, x, (128, 192), False)
    print("near-ties", ties, "of", labels.numel())
    assert ties <= labels.numel() // 1000


def test_exact_ties_and_nan():
    x = logits_for((1, 8, 9, 150))                 # two column tiles at W = 300
    x[:, 5] = x[:, 2] = x.max() + 1
    assert (resize_argmax(x, (20, 300), backend="cpu") == 2).all()
    nan_wins("cpu")


def test_auto_picks_cpu():
    assert backends.which("resize_argmax", "cpu", torch.bfloat16).name == "cpu"
    assert backends.which("resize_argmax", "cpu", torch.float64).name == "torch"
