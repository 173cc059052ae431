"""Test utilities shared by our tests and by users validating a backend on their own shapes.

The numerics contract (DESIGN.md), flash-attention's rule: with ``ref`` the op computed in fp64
from the same inputs and ``pt`` the reference computed by PyTorch in the input dtype,
``max|out - ref| <= factor * max|pt - ref| + 1e-5 * max|ref|`` with factor 2 for outputs and
3 for gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor


@dataclass
class ContractResult:
    name: str
    err: float        # max |out - ref|
    pt_err: float     # max |pt - ref|
    bound: float

    @property
    def ok(self) -> bool:
        return self.err <= self.bound

    def __str__(self) -> str:
        return (f"{self.name}: max|out-ref|={self.err:.3e}  max|pt-ref|={self.pt_err:.3e}  "
                f"bound={self.bound:.3e}  {'ok' if self.ok else 'VIOLATED'}")


def contract(out: Tensor, ref: Tensor, pt: Tensor, factor: float = 2.0, name: str = "output") -> ContractResult:
    """Measure ``out`` against the fp64 ``ref`` with the PyTorch-in-dtype error ``pt`` as yardstick."""
    if out.shape != ref.shape or pt.shape != ref.shape:
        raise AssertionError(f"{name}: shapes differ: out {tuple(out.shape)}, pt {tuple(pt.shape)}, "
                             f"ref {tuple(ref.shape)}")
    ref = ref.double()
    if not torch.isfinite(out).all():
        return ContractResult(name, math.inf, (pt.double() - ref).abs().max().item(), 0.0)
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    pt_err = (pt.double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return ContractResult(name, err, pt_err, factor * pt_err + 1e-5 * scale)


def assert_contract(out: Tensor, ref: Tensor, pt: Tensor, factor: float = 2.0, name: str = "output") -> ContractResult:
    """Assert the numerics contract; the message prints both errors and the bound."""
    r = contract(out, ref, pt, factor, name)
    assert r.ok, str(r)
    return r


def _cast(args, dtype):
    out = []
    for a in args:
        if isinstance(a, Tensor) and a.is_floating_point():
            a = a.detach().to(dtype).requires_grad_(a.requires_grad)
        out.append(a)
    return out


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def check_op(fused: Callable, reference: Callable, args: Sequence, dtype: torch.dtype, *,
             backward: bool = True, name: str = "op", seed: int = 0) -> list[ContractResult]:
    """Run ``fused`` and ``reference`` on ``args`` cast to ``dtype`` (and reference in fp64),
    assert the contract on the output and, if ``backward``, on the gradient of every tensor
    argument with ``requires_grad``. Returns the measured results (printable)."""
    grads_of = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.requires_grad]
    runs = {}
    for key, dt, fn in (("out", dtype, fused), ("pt", dtype, reference), ("ref", torch.float64, reference)):
        a = _cast(args, dt)
        runs[key] = (a, _first(fn(*a)))
    results = [assert_contract(runs["out"][1], runs["ref"][1], runs["pt"][1], 2.0, f"{name} {dtype} forward")]
    if backward and grads_of:
        g = torch.Generator(device="cpu").manual_seed(seed)
        gout = torch.randn(runs["ref"][1].shape, generator=g, dtype=torch.float64)
        for key in runs:
            a, y = runs[key]
            y.backward(gout.to(device=y.device, dtype=y.dtype))
        for i in grads_of:
            results.append(assert_contract(runs["out"][0][i].grad, runs["ref"][0][i].grad,
                                           runs["pt"][0][i].grad, 3.0, f"{name} {dtype} grad[{i}]"))
    return results


@torch.no_grad()
def init_realistic_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise weights at the scale of trained SegFormer checkpoints, not the 0.02-std init
    (which hides overflow and softmax saturation): unit-gain linears/convs, non-trivial biases,
    LayerNorm/BatchNorm affine away from identity, BatchNorm running statistics away from 0/1."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    for m in module.modules():
        w = getattr(m, "weight", None)
        b = getattr(m, "bias", None)
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = w[0].numel()
            randn(w, 1.0 / math.sqrt(fan_in))
            if b is not None:
                randn(b, 0.2)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
            if w is not None:
                randn(w, 0.3, 1.0)
            if b is not None:
                randn(b, 0.2)
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                randn(m.running_mean, 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
    return module
