"""The Triton resize_argmax (kernels/triton/resize_argmax.py), through the interpreter on CPU tensors
(tiny shapes: ~0.6 ms per program) or on a GPU: bit for bit the torch composition (labels and
scores), stock labels except counted near-ties, fp32/fp16/bf16, exact ties and NaN."""
from __future__ import annotations

import pytest
import torch

from segformer_fast.ops import resize_argmax
from test_resize_argmax import CASES, logits_for, nan_wins, same_bits_as_torch

pytest.importorskip("segformer_fast.kernels.triton.resize_argmax")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}->{c[1]}{'-ac' if c[2] else ''}")
def test_same_bits_as_torch_and_stock_labels(case):
    same_bits_as_torch("triton", case, seed=2, device=DEVICE)


def test_exact_ties_and_nan():
    x = logits_for((1, 6, 5, 7)).to(DEVICE)
    x[:, 4] = x[:, 1] = x.max() + 1
    assert (resize_argmax(x, (11, 9), backend="triton") == 1).all()
    nan_wins("triton", DEVICE)
