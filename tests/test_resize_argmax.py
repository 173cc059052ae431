"""resize_argmax (fused post-processing): labels against the stock path on every backend.

The stock path is ``F.interpolate(logits.float(), size, bilinear).argmax(1)``. Its CPU kernel rounds
some multiply-adds through FMAs that depend on shape and code path, ours never does, so labels may
differ where the top two classes are within fp32 rounding of each other: ``compare`` counts such
near-ties and fails on any other difference. Exact ties (equal fp32 scores) follow torch.argmax:
the lowest index; NaN wins. Backends other than torch/reference have their own files
(test_resize_argmax_{cpu,triton,cuda}.py) that reuse CASES and ``compare``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segformer_fast import backends
from segformer_fast import reference as R
from segformer_fast.ops import resize_argmax
import importlib
M = importlib.import_module("segformer_fast.ops.resize_argmax")

# (B, K, h, w) -> (H, W), align_corners: SegFormer's 4x, odd up/down sizes, non-square, 1x1 maps
CASES = [
    ((2, 19, 8, 12), (32, 48), False),        # 4x, batch 2, non-square
    ((1, 150, 9, 7), (37, 23), False),        # odd upsampling, 150 classes
    ((2, 7, 20, 17), (9, 11), False),         # downsampling
    ((1, 5, 13, 6), (29, 6), True),           # align_corners, one axis unchanged
    ((1, 3, 1, 1), (5, 4), False),            # a 1x1 map
    ((1, 4, 6, 9), (1, 1), True),             # to one pixel
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def logits_for(shape, dtype=torch.float32, seed=0, mag=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * mag).to(dtype)


def compare(labels, logits, size, align_corners, scores=None, what=""):
    """Asserts labels (B, H, W) equal the stock labels except at near-ties, which it counts and
    returns; checks the scores too when given (equal to the stock score of our label within rounding)."""
    up = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=align_corners)
    stock = up.argmax(1)
    assert labels.shape == stock.shape and labels.dtype == torch.int64, (labels.shape, labels.dtype)
    # interpolation rounding: a few ulps of the largest magnitude that enters a score
    tol = 8 * torch.finfo(torch.float32).eps * logits.float().abs().max().item()
    ours_score = up.gather(1, labels.unsqueeze(1)).squeeze(1)
    stock_score = up.gather(1, stock.unsqueeze(1)).squeeze(1)
    diff = labels != stock
    gap = (stock_score - ours_score)[diff]
    assert (gap <= tol).all(), f"{what}: {int((gap > tol).sum())} labels differ by more than rounding " \
                               f"(max gap {gap.max().item():.3g}, tol {tol:.3g})"
    if scores is not None:
        err = (scores - ours_score).abs().max().item()
        assert scores.dtype == torch.float32 and err <= tol, f"{what}: scores off by {err:.3g} (tol {tol:.3g})"
    return int(diff.sum())


def same_bits_as_torch(backend, case, seed, device="cpu"):
    """A kernel backend's labels and scores equal the torch composition's bit for bit in every
    dtype (and its labels-only call the same labels); the labels are stock except counted near-ties."""
    shape, size, ac = case
    for name, dtype in DTYPES.items():
        x = logits_for(shape, dtype, seed=seed).to(device)
        labels, scores = resize_argmax(x, size, ac, return_scores=True, backend=backend)
        tl, ts = resize_argmax(x, size, ac, return_scores=True, backend="torch")
        assert torch.equal(labels, tl) and torch.equal(scores, ts), name
        ties = compare(labels.cpu(), x.cpu(), size, ac, scores.cpu(), f"{backend} {name}")
        print(backend, name, shape, size, "near-ties", ties, "of", labels.numel())
        assert torch.equal(resize_argmax(x, size, ac, backend=backend), labels)


def nan_wins(backend, device="cpu"):
    """A NaN score wins its pixel, as in torch.argmax (two NaN pixels, no resize)."""
    y = logits_for((1, 5, 4, 4))
    y[0, 3, 1, 1] = float("nan")
    y[0, 1, 2, 2] = float("nan")
    assert torch.equal(resize_argmax(y.to(device), (4, 4), backend=backend).cpu(), y.argmax(1))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}->{c[1]}{'-ac' if c[2] else ''}")
def test_matches_stock(backend, case):
    shape, size, ac = case
    for name, dtype in DTYPES.items():
        x = logits_for(shape, dtype)
        labels, scores = resize_argmax(x, size, ac, return_scores=True, backend=backend)
        ties = compare(labels, x, size, ac, scores, f"{backend} {name}")
        print(backend, name, shape, size, ac, "near-ties", ties, "of", labels.numel())


def test_stock_sized_near_ties_are_rare():
    """150 classes, 64x64 -> 256x256 (SegFormer's 4x): the torch composition agrees with the stock
    labels everywhere but at counted near-ties, and they are rare."""
    x = logits_for((1, 150, 64, 64))
    labels = resize_argmax(x, (256, 256), backend="torch")
    ties = compare(labels, x, (256, 256), False)
    print("near-ties", ties, "of", labels.numel())
    assert ties <= labels.numel() // 1000


def test_exact_ties_take_lowest_index_and_nan_wins():
    x = logits_for((2, 6, 5, 7))
    x[:, 4] = x[:, 1] = x.max() + 1           # classes 1 and 4 equal everywhere and on top
    for backend in ("torch", "reference"):
        assert (resize_argmax(x, (11, 9), backend=backend) == 1).all()
    y = logits_for((1, 5, 4, 4))
    y[0, 3, 1, 1] = float("nan")
    y[0, 2, 2, 2] = float("nan")
    for backend in ("torch", "reference"):
        lab = resize_argmax(y, (4, 4), backend=backend)
        assert lab[0, 1, 1] == 3 and lab[0, 2, 2] == 2, lab
        assert torch.equal(lab, y.argmax(1))


def test_torch_chunks_change_nothing(monkeypatch):
    x = logits_for((2, 9, 7, 10))
    full = resize_argmax(x, (23, 31), return_scores=True, backend="torch")
    monkeypatch.setattr(M, "_TORCH_CHUNK", 1)           # one output row per chunk
    chunked = resize_argmax(x, (23, 31), return_scores=True, backend="torch")
    assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])


def test_axis_tables_are_pytorchs_weights():
    """One-hot inputs read F.interpolate's weights back: the tables match them exactly (the fused
    source index included), for up/down sizes in both align_corners modes."""
    for n_in, n_out in [(17, 45), (13, 61), (64, 1000), (40, 17), (7, 3), (1, 5), (5, 5)]:
        for ac in (False, True):
            eye = torch.eye(n_in).view(n_in, 1, 1, n_in)
            stock = F.interpolate(eye, (1, n_out), mode="bilinear", align_corners=ac)[:, 0, 0, :]
            i0, i1, l0, l1 = M.axis_tables(n_in, n_out, ac, "cpu")
            mine = torch.zeros(n_in, n_out)
            d = torch.arange(n_out)
            mine.index_put_((i0.long(), d), l0, accumulate=True)
            mine.index_put_((i1.long(), d), l1, accumulate=True)
            assert torch.equal(mine, stock), (n_in, n_out, ac)


def test_no_grad_needed_batch_zero_and_autocast():
    x = logits_for((1, 4, 5, 6)).requires_grad_()
    labels = resize_argmax(x, (10, 12), backend="torch")
    assert not labels.requires_grad
    assert resize_argmax(x[:0], (3, 3)).shape == (0, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(resize_argmax(x, (10, 12), backend="torch"), labels)
    assert backends.which("resize_argmax", "cpu").name in ("cpu", "torch")


@pytest.mark.parametrize("bad, match", [
    (lambda x: dict(logits=x[0]), r"\(B, classes, h, w\)"),
    (lambda x: dict(logits=x.long()), "floating point"),
    (lambda x: dict(logits=x[:, :0]), "at least 1 class"),
    (lambda x: dict(size=(0, 4)), "positive"),
    (lambda x: dict(size=(2.5, 4)), "must be an int"),
    (lambda x: dict(size=(1, 2, 3)), "pair of ints"),
    (lambda x: dict(align_corners=None), "align_corners must be a bool"),
    (lambda x: dict(return_scores=1), "return_scores must be a bool"),
    (lambda x: dict(logits=[1.0]), "must be a torch.Tensor"),
])
def test_bad_input_raises_before_launch(bad, match):
    x = logits_for((1, 3, 4, 4))
    kw = dict(logits=x, size=(8, 8), align_corners=False, return_scores=False)
    kw.update(bad(x))
    with pytest.raises((TypeError, ValueError), match=match):
        resize_argmax(kw["logits"], kw["size"], kw["align_corners"], return_scores=kw["return_scores"],
                      backend="torch")


def test_named_backend_that_cannot_run_lists_reasons():
    x = logits_for((1, 3, 4, 4)).double()
    with pytest.raises(backends.BackendUnavailable, match="dtype torch.float64"):
        resize_argmax(x, (8, 8), backend="cpu")


def test_reference_is_stock():
    x = logits_for((2, 5, 6, 7))
    assert torch.equal(R.resize_argmax(x, (13, 9)),
                       F.interpolate(x, (13, 9), mode="bilinear", align_corners=False).argmax(1))
