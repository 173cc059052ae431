"""The CUDA C++ resize_argmax (csrc/cuda/resize_argmax.cu): in the CUDA emulation on CPU tensors,
bit for bit the torch composition (labels and scores) in fp32/fp16/bf16 and two block orders, exact
ties and NaN; nvcc sm_80/sm_90a with 0 spills."""
from __future__ import annotations

import pytest
import torch

from segformer_fast.ops import resize_argmax
from test_resize_argmax import CASES, DTYPES, compare, logits_for

from cuda_testing import ARCHS, assert_no_spills, emu, needs_nvcc, order  # noqa: F401


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}->{c[1]}{'-ac' if c[2] else ''}")
def test_same_bits_as_torch_and_stock_labels(case, order):
    shape, size, ac = case
    for name, dtype in DTYPES.items():
        x = logits_for(shape, dtype, seed=5)
        labels, scores = resize_argmax(x, size, ac, return_scores=True, backend="cuda")
        tl, ts = resize_argmax(x, size, ac, return_scores=True, backend="torch")
        assert torch.equal(labels, tl) and torch.equal(scores, ts), name
        ties = compare(labels, x, size, ac, scores, f"cuda {name}")
        print(order, name, shape, size, "near-ties", ties)
    assert torch.equal(resize_argmax(x, size, ac, backend="cuda"), labels)


def test_exact_ties_and_nan(emu):
    x = logits_for((1, 6, 5, 7))
    x[:, 4] = x[:, 1] = x.max() + 1
    assert (resize_argmax(x, (11, 9), backend="cuda") == 1).all()
    y = logits_for((1, 5, 4, 4))
    y[0, 3, 1, 1] = float("nan")
    y[0, 1, 2, 2] = float("nan")
    assert torch.equal(resize_argmax(y, (4, 4), backend="cuda"), y.argmax(1))


@needs_nvcc
@pytest.mark.parametrize("arch", list(ARCHS))
def test_nvcc_no_spills(arch):
    report = assert_no_spills("cuda/resize_argmax.cu", arch)
    assert len(report) == 3, report          # fp32, fp16, bf16 instantiations
