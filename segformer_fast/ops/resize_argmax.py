"""Public op: fused semantic-segmentation post-processing, ``resize_argmax``.

``resize_argmax(logits, size, align_corners=False, *, return_scores=False, backend=None)``: class
logits (B, K, h, w) -> labels (B, H, W) int64 (and, with ``return_scores``, the winning fp32 score
(B, H, W)): the labels of ``F.interpolate(logits.float(), size, mode="bilinear",
align_corners=align_corners).argmax(1)`` (``segformer_fast.reference.resize_argmax``) computed in one
pass: each output pixel interpolates its K class scores on the fly and keeps the running maximum, so
the (B, K, H, W) full-resolution logits (1.26 GB for 150 classes at 1024x2048 in fp32) never exist.

Arithmetic (every implementation, bit for bit; fp32 whatever the logits' dtype, which are widened
exactly as they are read):

- per output index along each axis, F.interpolate's source index and weights, from tables
  computed once on the host (:func:`axis_tables`): ``scale`` = in / out (align_corners=False) or
  (in - 1) / (out - 1) (True; 0 when out = 1) as an fp32 quotient; ``src = scale * (d + 0.5) - 0.5``
  rounded once (PyTorch's own CPU and CUDA builds contract it into an FMA: measured on torch 2.13,
  the separately rounded form gives other weights for e.g. 17 -> 45), clamped at 0, or
  ``src = scale * d`` (align_corners); ``i0 = min(floor(src), in - 1)``, ``i1 = i0 + (i0 < in - 1)``,
  ``l1 = clamp(src - i0, 0, 1)``, ``l0 = 1 - l1``; an axis whose size does not change copies
  (l0 = 1, l1 = 0).
- the score of class k: ``t0 = l0x * v00 + l1x * v01``, ``t1 = l0x * v10 + l1x * v11``,
  ``s = l0y * t0 + l1y * t1``, every product and sum rounded to fp32 (no FMA contraction: the
  kernels are built with contraction off).
- the label: the first class index whose score is greater than every earlier one (``>``, so among
  exactly equal fp32 scores the lowest index wins, as ``torch.argmax``); a NaN score wins over any
  number and the first NaN is kept (``torch.argmax`` treats NaN as the maximum).

PyTorch's own CPU kernel contracts some of its multiply-adds into FMAs depending on the shape and
on the code path it takes (measured: the 4x upsamplings SegFormer uses agree bit for bit with the
rule above; odd sizes differ by an ulp here and there), so its labels can differ from these only
where the top two classes are within fp32 rounding of each other: the tests count such near-ties
and check that every difference is one.

Inference only: no implementation has a backward (argmax has no gradient); logits that require
grad are read detached, so the op drops into ``torch.no_grad()``-less post-processing code.
Autocast does not change it (the scores are fp32 from the logits as given).

Implementations (``segformer_fast.backends``): ``triton`` (one program per tile of output pixels,
loop over classes), ``cuda`` (its CUDA C++ twin, csrc/cuda/resize_argmax.cu; on CPU tensors the CUDA
emulation when ``SEGFORMER_FAST_CUDA_EMULATE=1`` and ``cuda`` is named), ``cpu``
(csrc/cpu/resize_argmax.cpp: tiles of output rows x columns across threads, each source row
interpolated along W once per tile and kept while output rows use it; AVX-512 or portable),
``torch`` (gathers of stock ops chunked over output rows so that at most ~2M fp32 scores per
temporary exist at once), ``reference``.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import reference
from ..backends import FLOATS, GPU_FLOATS, Impl, needs_native_cpu, needs_triton, register
from ._common import choose, cuda_limits, register_autocast, size_pair

__all__ = ["resize_argmax", "axis_tables"]

_OP = "resize_argmax"
# torch implementation: elements per (B, K, rows, W) temporary of one chunk of output rows
_TORCH_CHUNK = 1 << 21


def _check(logits, size, align_corners, return_scores):
    if not isinstance(logits, Tensor):
        raise TypeError(f"{_OP}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 4:
        raise ValueError(f"{_OP}: logits must be (B, classes, h, w), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{_OP}: logits must be floating point, got {logits.dtype}")
    B, K, h, w = logits.shape
    if K < 1 or h < 1 or w < 1:
        raise ValueError(f"{_OP}: logits need at least 1 class and a non-empty map, got shape "
                         f"{tuple(logits.shape)}")
    H, W = size_pair(size, "size", _OP)
    if not (H > 0 and W > 0):
        raise ValueError(f"{_OP}: size must be positive (H, W), got {size!r}")
    if not isinstance(align_corners, bool):
        raise TypeError(f"{_OP}: align_corners must be a bool, got {align_corners!r}")
    if not isinstance(return_scores, bool):
        raise TypeError(f"{_OP}: return_scores must be a bool, got {return_scores!r}")
    if H * W * B >= 2 ** 31 or K * h * w * B >= 2 ** 31:
        raise ValueError(f"{_OP}: 2^31 or more output pixels or input elements are not supported, got "
                         f"logits {tuple(logits.shape)} -> size {(H, W)}")
    return int(H), int(W)


@functools.lru_cache(maxsize=256)
def _axis_cpu(n_in: int, n_out: int, align_corners: bool):
    if n_in == n_out:
        i0 = torch.arange(n_out, dtype=torch.int32)
        return i0, i0.clone(), torch.ones(n_out), torch.zeros(n_out)
    f32 = torch.float32
    if align_corners:
        scale = (torch.tensor(n_in - 1, dtype=f32) / (n_out - 1)) if n_out > 1 else torch.tensor(0.0)
        src = scale * torch.arange(n_out, dtype=f32)                    # exact d for d < 2^24
    else:
        scale = torch.tensor(n_in, dtype=f32) / n_out
        # scale * (d + 0.5) - 0.5 rounded once (an FMA): the product of two floats is exact in
        # fp64 and subtracting 0.5 from it stays exact, so the fp64 value rounds to fp32 once
        d = torch.arange(n_out, dtype=torch.float64)
        src = (scale.double() * (d + 0.5) - 0.5).to(f32).clamp_min(0.0)
    i0 = torch.floor(src).to(torch.int64).clamp_max(n_in - 1)
    l1 = (src - i0.to(f32)).clamp(0.0, 1.0)
    i1 = i0 + (i0 < n_in - 1).to(torch.int64)
    return i0.to(torch.int32), i1.to(torch.int32), 1.0 - l1, l1


def axis_tables(n_in: int, n_out: int, align_corners: bool, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(i0, i1) int32 and (l0, l1) fp32, each (n_out,): the two source indices along one axis of
    output index d and their weights (see the module docstring), on ``device``."""
    return tuple(t.to(device) for t in _axis_cpu(int(n_in), int(n_out), bool(align_corners)))


def _tables(logits, H, W, align_corners):
    h, w = logits.shape[-2:]
    return (*axis_tables(h, H, align_corners, logits.device), *axis_tables(w, W, align_corners, logits.device))


def _empty_scores(logits, B, H, W, return_scores):
    return logits.new_empty((B, H, W) if return_scores else (0,), dtype=torch.float32)


def _fake(logits, size, align_corners, return_scores):
    B = logits.shape[0]
    labels = logits.new_empty((B, size[0], size[1]), dtype=torch.int64)
    return labels, _empty_scores(logits, B, size[0], size[1], return_scores)


# ---------------------------------------------------------------- torch: stock ops, row chunks
def _torch_impl(logits, size, align_corners, return_scores):
    B, K, h, w = logits.shape
    H, W = size
    yi0, yi1, wy0, wy1, xi0, xi1, wx0, wx1 = _tables(logits, H, W, align_corners)
    xi0, xi1 = xi0.long(), xi1.long()
    labels = torch.empty((B, H, W), dtype=torch.int64, device=logits.device)
    scores = torch.empty((B, H, W), dtype=torch.float32, device=logits.device) if return_scores else None
    # output rows per chunk; a downsampling chunk reads ~h/H source rows per output row
    rows = max(1, _TORCH_CHUNK // (B * K * W * max(1, -(-h // H))))
    cpu_y0, cpu_y1 = _axis_cpu(h, H, align_corners)[:2]       # host copies: no device sync
    for r in range(0, H, rows):
        e = min(H, r + rows)
        # the source rows this chunk reads (the index tables are non-decreasing), interpolated along
        # W once each: (B, K, n, W) fp32
        lo, hi = int(cpu_y0[r]), int(cpu_y1[e - 1]) + 1
        src = logits[:, :, lo:hi].float()
        t = src.index_select(3, xi0).mul_(wx0).add_(src.index_select(3, xi1).mul_(wx1))
        # then along H: the two source rows of each output row, blended
        t = (t.index_select(2, (yi0[r:e] - lo).long()).mul_(wy0[r:e, None])
             .add_(t.index_select(2, (yi1[r:e] - lo).long()).mul_(wy1[r:e, None])))
        # max over classes: the first index of the maximum (NaN counts as the maximum), as argmax
        s, lab = t.max(1)
        labels[:, r:e] = lab
        if scores is not None:
            scores[:, r:e] = s
    return labels, scores if scores is not None else _empty_scores(logits, B, H, W, False)


def _run_reference(logits, size, align_corners, return_scores):
    out = reference.resize_argmax(logits, size, align_corners, return_scores=return_scores)
    if return_scores:
        return out
    return out, _empty_scores(logits, logits.shape[0], *size, False)


# ---------------------------------------------------------------- cpu: csrc/cpu/resize_argmax.cpp
@torch.library.custom_op("segformer_fast::resize_argmax_cpu", mutates_args=())
def _resize_argmax_cpu(logits: Tensor, size: list[int], align_corners: bool,
                       return_scores: bool) -> tuple[Tensor, Tensor]:
    from ..kernels.cpu import native
    return tuple(native().resize_argmax_forward(logits.contiguous(), *_tables(logits, *size, align_corners),
                                                size[0], size[1], return_scores))


# ---------------------------------------------------------------- triton
@torch.library.custom_op("segformer_fast::resize_argmax", mutates_args=())
def _resize_argmax_triton(logits: Tensor, size: list[int], align_corners: bool,
                          return_scores: bool) -> tuple[Tensor, Tensor]:
    from ..kernels.triton.resize_argmax import resize_argmax_fwd
    return resize_argmax_fwd(logits.contiguous(), *_tables(logits, *size, align_corners), tuple(size),
                             return_scores)


# ---------------------------------------------------------------- cuda: csrc/cuda/resize_argmax.cu
@torch.library.custom_op("segformer_fast::cuda_resize_argmax", mutates_args=())
def _resize_argmax_cuda(logits: Tensor, size: list[int], align_corners: bool,
                        return_scores: bool) -> tuple[Tensor, Tensor]:
    from ..kernels.cuda import resize_argmax_fwd
    return resize_argmax_fwd(logits.contiguous(), *_tables(logits, *size, align_corners), tuple(size),
                             return_scores)


for _op in (_resize_argmax_cpu, _resize_argmax_triton, _resize_argmax_cuda):
    _op.register_fake(_fake)
    register_autocast(_op, "keep")       # post-processing reads the logits as given, in fp32


def _runner(op):
    def run(logits, size, align_corners, return_scores):
        return op(logits, list(size), align_corners, return_scores)
    return run


IMPLS = register(_OP, [
    Impl("triton", _runner(_resize_argmax_triton), devices=("cuda",), dtypes=GPU_FLOATS, backward=False,
         requires=needs_triton, interpreter_on_cpu=True),
    Impl("cuda", _runner(_resize_argmax_cuda), devices=("cuda", "cpu"), dtypes=GPU_FLOATS, backward=False,
         limits=lambda inputs: cuda_limits(inputs)),
    Impl("cpu", _runner(_resize_argmax_cpu), devices=("cpu",), dtypes=GPU_FLOATS, backward=False,
         requires=needs_native_cpu),
    Impl("torch", _torch_impl, dtypes=FLOATS, backward=False),
    Impl("reference", _run_reference, dtypes=FLOATS, backward=False),
])


def resize_argmax(logits: Tensor, size, align_corners: bool = False, *, return_scores: bool = False,
                  backend: str | None = None):
    """Labels (B, H, W) int64 of bilinearly resized class logits, without full-resolution logits.

    logits: (B, K, h, w), fp32/fp16/bf16 (fp64 on the torch and reference backends); size: (H, W) or
    an int for (H, H), up or down, any aspect; align_corners as in F.interpolate. Returns the labels
    of ``F.interpolate(logits.float(), size, mode="bilinear", align_corners=...).argmax(1)`` (ties:
    the lowest class index among exactly equal fp32 scores; NaN wins), or ``(labels, scores)`` with
    the winning fp32 scores (B, H, W) when ``return_scores``. Inference only (results carry no
    gradient). ``backend`` pins one implementation (None: the process-wide choice). See the module
    docstring for the exact arithmetic.
    """
    H, W = _check(logits, size, align_corners, return_scores)
    logits = logits.detach()
    B = logits.shape[0]
    if B == 0:
        labels = torch.empty((0, H, W), dtype=torch.int64, device=logits.device)
        return (labels, torch.empty((0, H, W), device=logits.device)) if return_scores else labels
    impl = choose(_OP, logits.device, logits.dtype, False, backend)
    labels, scores = impl.run(logits, (H, W), align_corners, return_scores)
    return (labels, scores) if return_scores else labels
