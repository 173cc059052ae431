"""Linear layers through oneDNN on CPU inference.

On CPU, ``F.linear``/``addmm`` in fp32 calls MKL's sgemm, and a 1x1 ``conv2d`` on a channels-last
view can fall to the slow im2col path; oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``,
the primitive inductor's CPU fusions call, which takes plain dense tensors) ran SegFormer's GEMM
shapes 1.6-3.8x faster in fp32 on the 2-core AVX-512 machine of issue 16 (interleaved medians:
fc1 16384x32->128 3.8x, a transposed NCHW stage map 1.6x, the 256->150 classifier at 128² 2.0x);
whole patched model, fp32 512²: 1.11x on B0 and B2 with one thread, neutral (0.98-1.05x, noise)
with two. In bf16 it is the kernel PyTorch itself picks. Same fp32 arithmetic (no TF32/bf16 down-
conversion: oneDNN's default fp32 math mode), only the summation order differs.

Used only where nothing needs what the stock call gives: inference (no autograd graph), eager
(not while torch.compile/export/ONNX trace: they see stock ``F.linear``), CPU fp32/bf16 tensors,
plain weights. ``SEGFORMER_FAST_ONEDNN_LINEAR=0`` turns it off (A/B runs).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._parts import plain

__all__ = ["linear", "linear_module"]

_DTYPES = (torch.float32, torch.bfloat16)


def _available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and os.environ.get("SEGFORMER_FAST_ONEDNN_LINEAR", "1") != "0")


_OK = _available()


def usable(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str | None) -> bool:
    """Whether ``linear`` may take the oneDNN path for this call (dtypes are judged in ``linear``)."""
    return (_OK and x.device.type == "cpu" and weight.device.type == "cpu" and x.dim() >= 2
            and x.shape[-1] > 0 and backend in (None, "auto", "cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                   or (bias is not None and bias.requires_grad)))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export()
            and not torch.jit.is_tracing())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; on CPU inference through oneDNN (see the module docstring).
    x may be any strided view whose rows flatten to a 2-D view (a transposed NCHW map does).
    Under autocast the stock call runs (it already reaches oneDNN in bf16: measured no gain)."""
    if not usable(x, weight, bias, backend):
        return F.linear(x, weight, bias)
    if x.dtype not in _DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    try:
        x2 = x.view(-1, x.shape[-1])
    except RuntimeError:                       # rows that no 2-D view spans: the stock call
        return F.linear(x, weight, bias)
    if not weight.is_contiguous():
        return F.linear(x, weight, bias)
    out = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    return out.view(*lead, weight.shape[0])


def linear_module(m, backend: str | None = None):
    """``m`` as a callable: a plain ``nn.Linear`` runs through :func:`linear`; anything else
    (LoRA, quantised, hooked) is called as the module it is."""
    if plain(m, nn.Linear):
        return lambda t: linear(t, m.weight, m.bias, backend)
    return m
