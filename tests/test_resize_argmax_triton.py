"""The Triton resize_argmax (kernels/triton/resize_argmax.py), through the interpreter on CPU tensors
(tiny shapes: ~0.6 ms per program) or on a GPU: bit for bit the torch composition (labels and
scores), stock labels except counted near-ties, fp32/fp16/bf16, exact ties and NaN."""
from __future__ import annotations

import pytest
import torch

from segformer_fast.ops import resize_argmax
from test_resize_argmax import CASES, DTYPES, compare, logits_for

pytest.importorskip("segformer_fast.kernels.triton.resize_argmax")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}->{c[1]}{'-ac' if c[2] else ''}")
def test_same_bits_as_torch_and_stock_labels(case):
    shape, size, ac = case
    for name, dtype in DTYPES.items():
        x = logits_for(shape, dtype, seed=2).to(DEVICE)
        labels, scores = resize_argmax(x, size, ac, return_scores=True, backend="triton")
        tl, ts = resize_argmax(x, size, ac, return_scores=True, backend="torch")
        assert torch.equal(labels, tl) and torch.equal(scores, ts), name
        ties = compare(labels.cpu(), x.cpu(), size, ac, scores.cpu(), f"triton {name}")
        print(name, shape, size, "near-ties", ties, "of", labels.numel())
    assert torch.equal(resize_argmax(x, size, ac, backend="triton"), labels)


def test_exact_ties_and_nan():
    x = logits_for((1, 6, 5, 7)).to(DEVICE)
    x[:, 4] = x[:, 1] = x.max() + 1
    assert (resize_argmax(x, (11, 9), backend="triton") == 1).all()
    y = logits_for((1, 5, 4, 4))
    y[0, 3, 1, 1] = float("nan")
    y[0, 1, 2, 2] = float("nan")
    assert torch.equal(resize_argmax(y.to(DEVICE), (4, 4), backend="triton").cpu(), y.argmax(1))
