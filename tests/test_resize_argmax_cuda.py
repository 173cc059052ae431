"""The CUDA C++ resize_argmax (csrc/cuda/resize_argmax.cu): in the CUDA emulation on CPU tensors,
bit for bit the torch composition (labels and scores) in fp32/fp16/bf16 and two block orders, exact
ties and NaN; nvcc sm_80/sm_90a with 0 spills."""
from __future__ import annotations

import pytest

from segformer_fast.ops import resize_argmax
from test_resize_argmax import CASES, logits_for, nan_wins, same_bits_as_torch

from cuda_testing import ARCHS, assert_no_spills, emu, needs_nvcc, order  # noqa: F401


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}->{c[1]}{'-ac' if c[2] else ''}")
def test_same_bits_as_torch_and_stock_labels(case, order):
    print("block order", order)
    same_bits_as_torch("cuda", case, seed=5)


def test_exact_ties_and_nan(emu):
    x = logits_for((1, 6, 5, 7))
    x[:, 4] = x[:, 1] = x.max() + 1
    assert (resize_argmax(x, (11, 9), backend="cuda") == 1).all()
    nan_wins("cuda")


@needs_nvcc
@pytest.mark.parametrize("arch", list(ARCHS))
def test_nvcc_no_spills(arch):
    report = assert_no_spills("cuda/resize_argmax.cu", arch)
    assert len(report) == 3, report          # fp32, fp16, bf16 instantiations
