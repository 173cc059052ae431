"""Public op: the folded SegFormer decoder's epilogue, ``upsample_sum``.

``upsample_sum(maps, hws, size, bias=None, scale=None, shift=None, relu=False, *, backend=None)``:
maps[i] tokens (B, H_i*W_i, D) with hws[i] = (H_i, W_i) -> tokens (B, size[0]*size[1], D) =
relu((sum_i up(map_i) + bias) * scale + shift), each term only where given (see
``segformer_fast.reference.upsample_sum``).

Implementations (``segformer_fast.backends``): ``triton`` (one fused gather kernel forward;
epilogue-backward + adjoint-gather kernels backward; any number of maps, unrolled), ``cpu``
(csrc/cpu/upsample_sum.cpp: one pass, fp32 or bf16 with fp32 sums, no backward: ``auto`` takes ``torch`` for calls needing
gradients or other dtypes, a request for ``cpu`` by name raises for them), ``torch``
(F.interpolate on channels-last *views* of the tokens, summed in place: no layout copies),
``cuda`` (the CUDA C++ twin of the Triton kernels, csrc/cuda/upsample_sum.cu, at most 4 maps: nvcc
build on CUDA tensors; on CPU tensors the CUDA emulation, when ``SEGFORMER_FAST_CUDA_EMULATE=1`` and
``cuda`` is named), ``reference``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..backends import GPU_FLOATS, Impl, Inputs, needs_native_cpu, register, triton_impl
from ._common import autocast_policy, choose, cuda_limits, needs_grad, register_autocast

__all__ = ["upsample_sum"]

_MAX_CUDA_MAPS = 4      # csrc/cuda/upsample_sum.cu's fixed-size pointer array


def _is_size(s) -> bool:
    return isinstance(s, torch.SymInt) or (isinstance(s, int) and not isinstance(s, bool))


def _check(maps, hws, size, bias, scale, shift, relu) -> None:
    if not isinstance(maps, (list, tuple)) or len(maps) == 0:
        raise TypeError(f"upsample_sum: maps must be a non-empty list of tensors, got "
                        f"{type(maps).__name__}")
    if not isinstance(hws, (list, tuple)) or len(hws) != len(maps):
        raise ValueError(f"upsample_sum: need one (H, W) per map: {len(maps)} maps, "
                         f"hws={hws!r}")
    if not isinstance(size, (list, tuple, torch.Size)) or len(size) != 2 or not all(
            _is_size(s) and s > 0 for s in size):
        raise ValueError(f"upsample_sum: size must be (H, W) positive ints, got {size!r}")
    first = maps[0]
    for i, (m, hw) in enumerate(zip(maps, hws)):
        if not isinstance(m, Tensor):
            raise TypeError(f"upsample_sum: maps[{i}] must be a torch.Tensor, got {type(m).__name__}")
        if m.dim() != 3:
            raise ValueError(f"upsample_sum: maps[{i}] must be tokens (B, H*W, D), got shape "
                             f"{tuple(m.shape)}")
        if not m.is_floating_point():
            raise TypeError(f"upsample_sum: maps[{i}] must be floating point, got {m.dtype}")
        if m.dtype != first.dtype:
            raise TypeError(f"upsample_sum: all maps must share one dtype: maps[0] {first.dtype}, "
                            f"maps[{i}] {m.dtype}")
        if m.device != first.device:
            raise ValueError(f"upsample_sum: all maps must be on one device: maps[0] {first.device}, "
                             f"maps[{i}] {m.device}")
        if m.shape[0] != first.shape[0] or m.shape[2] != first.shape[2]:
            raise ValueError(f"upsample_sum: maps[{i}] has shape {tuple(m.shape)}, expected "
                             f"(B={first.shape[0]}, H*W, D={first.shape[2]})")
        if (not isinstance(hw, (list, tuple, torch.Size)) or len(hw) != 2
                or not all(_is_size(s) and s > 0 for s in hw)):
            raise ValueError(f"upsample_sum: hws[{i}] must be (H, W) positive ints, got {hw!r}")
        if hw[0] * hw[1] != m.shape[1]:
            raise ValueError(f"upsample_sum: maps[{i}] has N = {m.shape[1]} tokens but hws[{i}] = "
                             f"{tuple(hw)} gives H*W = {hw[0] * hw[1]}")
    D = first.shape[2]
    for name, t in (("bias", bias), ("scale", scale), ("shift", shift)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"upsample_sum: {name} must be a tensor or None, got {type(t).__name__}")
        if t.shape != (D,):
            raise ValueError(f"upsample_sum: {name} must have shape (D,) = ({D},), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"upsample_sum: {name} must be floating point, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"upsample_sum: {name} is on {t.device}, maps on {first.device}")
    if not isinstance(relu, bool):
        raise TypeError(f"upsample_sum: relu must be a bool, got {type(relu).__name__}")


def _pairs(flat: Sequence[int]) -> list[tuple[int, int]]:
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]


# ---------------------------------------------------------------- triton: torch.library ops
@torch.library.custom_op("segformer_fast::upsample_sum", mutates_args=())
def _upsample_sum_op(maps: list[Tensor], hws: list[int], size: list[int], bias: Optional[Tensor],
                     scale: Optional[Tensor], shift: Optional[Tensor], relu: bool) -> Tensor:
    from ..kernels.triton.upsample_sum import upsample_sum_fwd
    return upsample_sum_fwd([m.contiguous() for m in maps], _pairs(hws), tuple(size), bias, scale,
                            shift, relu)


@_upsample_sum_op.register_fake
def _fwd_fake(maps, hws, size, bias, scale, shift, relu):
    B, _, D = maps[0].shape
    return maps[0].new_empty((B, size[0] * size[1], D))


@torch.library.custom_op("segformer_fast::upsample_sum_epilogue_bwd", mutates_args=())
def _epilogue_bwd_op(grad: Tensor, maps: list[Tensor], hws: list[int], size: list[int],
                     bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                     relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.triton.upsample_sum import epilogue_bwd
    return epilogue_bwd(grad, [m.contiguous() for m in maps], _pairs(hws), tuple(size), bias, scale,
                        shift, relu)


@_epilogue_bwd_op.register_fake
def _epilogue_fake(grad, maps, hws, size, bias, scale, shift, relu):
    D = maps[0].shape[2]
    vec = grad.new_empty((D,), dtype=torch.float32)
    return grad.new_empty(grad.shape, dtype=torch.float32), vec, vec.clone(), vec.clone()


@torch.library.custom_op("segformer_fast::upsample_adjoint", mutates_args=())
def _adjoint_op(dz: Tensor, hws: list[int], size: list[int], dtype: torch.dtype) -> list[Tensor]:
    from ..kernels.triton.upsample_sum import upsample_adjoint
    dz = dz.contiguous()
    return [upsample_adjoint(dz, hw, tuple(size), dtype) for hw in _pairs(hws)]


@_adjoint_op.register_fake
def _adjoint_fake(dz, hws, size, dtype):
    B, _, D = dz.shape
    return [dz.new_empty((B, h * w, D), dtype=dtype) for h, w in _pairs(hws)]


def _setup_context(ctx, inputs, output):
    maps, hws, size, bias, scale, shift, relu = inputs
    ctx.save_for_backward(*maps, bias, scale, shift)
    ctx.n_maps = len(maps)
    ctx.hws, ctx.size, ctx.relu = list(hws), list(size), relu


def _backward_with(epilogue_op, adjoint_op):
    """The autograd backward of a forward op whose backward pieces are ``epilogue_op`` and
    ``adjoint_op`` (triton or cuda)."""
    def backward(ctx, grad):
        return _backward(ctx, grad, epilogue_op, adjoint_op)
    return backward


def _backward(ctx, grad, epilogue_op, adjoint_op):
    saved = ctx.saved_tensors
    maps, (bias, scale, shift) = list(saved[:ctx.n_maps]), saved[ctx.n_maps:]
    hws, size = _pairs(ctx.hws), tuple(ctx.size)
    dbias = dscale = dshift = None
    if scale is not None or shift is not None or ctx.relu:
        dz, db, ds, dsh = epilogue_op(grad, maps, ctx.hws, ctx.size, bias, scale, shift, ctx.relu)
        dbias = db.to(bias.dtype) if bias is not None else None
        dscale = ds.to(scale.dtype) if scale is not None else None
        dshift = dsh.to(shift.dtype) if shift is not None else None
    else:
        # no epilogue: d(sum) is the incoming gradient itself; dbias is one fp32 column sum
        dz = grad
        if bias is not None:
            dbias = grad.sum(dim=(0, 1), dtype=torch.float32).to(bias.dtype)
    up = [i for i, hw in enumerate(hws) if tuple(hw) != size]
    grads: list = [None] * len(maps)
    if up:
        flat = [s for i in up for s in hws[i]]
        for i, g in zip(up, adjoint_op(dz, flat, ctx.size, maps[0].dtype)):
            grads[i] = g
    for i, hw in enumerate(hws):
        if tuple(hw) == size:
            grads[i] = dz.to(maps[i].dtype)
    return grads, None, None, dbias, dscale, dshift, None


_upsample_sum_op.register_autograd(_backward_with(torch.ops.segformer_fast.upsample_sum_epilogue_bwd,
                                                  torch.ops.segformer_fast.upsample_adjoint),
                                   setup_context=_setup_context)
register_autocast(_upsample_sum_op, "lower")
register_autocast(_epilogue_bwd_op, "keep")
register_autocast(_adjoint_op, "keep")


# ---------------------------------------------------------------- cuda: CUDA C++ kernels (csrc/cuda)
# The same three pieces as the triton path (fused forward; epilogue backward; separable adjoint
# gather), own op names so that traced graphs say which kernels they call.
@torch.library.custom_op("segformer_fast::cuda_upsample_sum", mutates_args=())
def _cuda_fwd(maps: list[Tensor], hws: list[int], size: list[int], bias: Optional[Tensor],
              scale: Optional[Tensor], shift: Optional[Tensor], relu: bool) -> Tensor:
    from ..kernels.cuda import upsample_sum_fwd
    return upsample_sum_fwd([m.contiguous() for m in maps], _pairs(hws), tuple(size), bias, scale, shift, relu)


@torch.library.custom_op("segformer_fast::cuda_upsample_sum_epilogue_bwd", mutates_args=())
def _cuda_epilogue_bwd(grad: Tensor, maps: list[Tensor], hws: list[int], size: list[int],
                       bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                       relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.cuda import upsample_sum_epilogue_bwd
    return upsample_sum_epilogue_bwd(grad, [m.contiguous() for m in maps], _pairs(hws), tuple(size), bias,
                                     scale, shift, relu)


@torch.library.custom_op("segformer_fast::cuda_upsample_adjoint", mutates_args=())
def _cuda_adjoint(dz: Tensor, hws: list[int], size: list[int], dtype: torch.dtype) -> list[Tensor]:
    from ..kernels.cuda import upsample_adjoint
    return [upsample_adjoint(dz, hw, tuple(size), dtype) for hw in _pairs(hws)]


_cuda_fwd.register_fake(_fwd_fake)
_cuda_epilogue_bwd.register_fake(_epilogue_fake)
_cuda_adjoint.register_fake(_adjoint_fake)
_cuda_fwd.register_autograd(_backward_with(_cuda_epilogue_bwd, _cuda_adjoint), setup_context=_setup_context)
register_autocast(_cuda_fwd, "lower")
register_autocast(_cuda_epilogue_bwd, "keep")
register_autocast(_cuda_adjoint, "keep")


# ---------------------------------------------------------------- torch: stock composition
def _torch_impl(maps, hws, size, bias, scale, shift, relu) -> Tensor:
    B, _, D = maps[0].shape
    H, W = size
    params = [t for t in (bias, scale, shift) if t is not None]
    # in place wherever autograd does not need the overwritten value
    inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in list(maps) + params))
    total, fresh = None, False
    # upsampled maps first: F.interpolate returns a fresh channels-last tensor to accumulate into
    # (a list split, not sorted(key=...): the comparisons are SymBools while tracing)
    at_size = [hws[i][0] == H and hws[i][1] == W for i in range(len(maps))]
    order = [i for i in range(len(maps)) if not at_size[i]] + [i for i in range(len(maps)) if at_size[i]]
    for i in order:
        h, w = hws[i]
        x = maps[i].view(B, h, w, D).permute(0, 3, 1, 2)       # NCHW view, channels-last memory
        is_new = not at_size[i]
        if is_new:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        if total is None:
            total, fresh = x, is_new
        elif fresh:
            total = total.add_(x) if inplace else total + x
        else:
            total, fresh = total + x, True

    def apply(t, fn_, fn):
        return fn_(t) if (inplace and fresh) else fn(t)

    if bias is not None:
        total = apply(total, lambda t: t.add_(bias.view(D, 1, 1)), lambda t: t + bias.view(D, 1, 1))
        fresh = True
    if scale is not None:
        total = apply(total, lambda t: t.mul_(scale.view(D, 1, 1)), lambda t: t * scale.view(D, 1, 1))
        fresh = True
    if shift is not None:
        total = apply(total, lambda t: t.add_(shift.view(D, 1, 1)), lambda t: t + shift.view(D, 1, 1))
        fresh = True
    if relu:
        total = apply(total, torch.relu_, torch.relu)
    # channels-last NCHW -> tokens: a view when total is channels-last contiguous
    return total.permute(0, 2, 3, 1).reshape(B, H * W, D)


@torch.library.custom_op("segformer_fast::upsample_sum_cpu", mutates_args=())
def _upsample_sum_cpu(maps: list[Tensor], hws: list[int], size: list[int], bias: Optional[Tensor],
                      scale: Optional[Tensor], shift: Optional[Tensor], relu: bool) -> Tensor:
    # a custom op, so torch.compile keeps the native call in its graph instead of breaking there
    from ..kernels.cpu import native

    f32 = [None if t is None else t.float().contiguous() for t in (bias, scale, shift)]
    return native().upsample_sum_forward([m.contiguous() for m in maps], hws, size[0], size[1], *f32, relu)


@_upsample_sum_cpu.register_fake
def _(maps, hws, size, bias, scale, shift, relu):
    return maps[0].new_empty(maps[0].shape[0], size[0] * size[1], maps[0].shape[2])


register_autocast(_upsample_sum_cpu, "lower")     # bf16 maps run natively (fp32 sums)


def _run_cpu(maps, hws, size, bias, scale, shift, relu) -> Tensor:
    return _upsample_sum_cpu(list(maps), [s for hw in hws for s in hw], list(size), bias, scale, shift, relu)


def _run_triton(maps, hws, size, bias, scale, shift, relu) -> Tensor:
    return _upsample_sum_op(list(maps), [s for hw in hws for s in hw], list(size), bias, scale, shift, relu)


def _run_cuda(maps, hws, size, bias, scale, shift, relu) -> Tensor:
    return _cuda_fwd(list(maps), [s for hw in hws for s in hw], list(size), bias, scale, shift, relu)


def _cuda_limits(inputs: Inputs) -> list[str]:
    n = inputs.facts.get("maps")
    return cuda_limits(inputs, [f"at most {_MAX_CUDA_MAPS} maps, got {n}"]
                       if n is not None and n > _MAX_CUDA_MAPS else [])


def _run_reference(maps, hws, size, bias, scale, shift, relu) -> Tensor:
    return reference.upsample_sum(maps, hws, size, bias=bias, scale=scale, shift=shift, relu=relu)


IMPLS = register("upsample_sum", [
    triton_impl(_run_triton),
    Impl("cuda", _run_cuda, devices=("cuda", "cpu"), dtypes=GPU_FLOATS, limits=_cuda_limits),
    Impl("cpu", _run_cpu, devices=("cpu",), dtypes=(torch.float32, torch.bfloat16), backward=False,
         requires=needs_native_cpu),
    Impl("torch", _torch_impl, onnx=True),
    Impl("reference", _run_reference, onnx=True),
])


@autocast_policy
def upsample_sum(maps: Sequence[Tensor], hws: Sequence[tuple[int, int]], size: tuple[int, int],
                 bias: Tensor | None = None, scale: Tensor | None = None, shift: Tensor | None = None,
                 relu: bool = False, *, backend: str | None = None) -> Tensor:
    """Sum of bilinearly upsampled token maps with a fused affine + ReLU epilogue.

    maps[i]: tokens (B, H_i*W_i, D), channels contiguous, with hws[i] = (H_i, W_i); each map is
    upsampled to ``size`` (bilinear, align_corners=False, F.interpolate's index math; a map already
    at ``size`` passes unchanged), the maps are summed, then ``+ bias``, ``* scale + shift`` (eval
    BatchNorm, folded) and ReLU, each only where given (bias/scale/shift: (D,)). Sizes may be
    SymInts while tracing. Under autocast all tensors run in the autocast dtype.
    Returns tokens (B, size[0]*size[1], D) in the maps' dtype. Differentiable in maps, bias, scale
    and shift (the ``cpu`` implementation has no backward: see the module docstring).
    ``backend`` pins one implementation (None: the process-wide choice).
    """
    _check(maps, hws, size, bias, scale, shift, relu)
    hws = [tuple(hw) for hw in hws]
    size = tuple(size)
    impl = choose("upsample_sum", maps[0].device, maps[0].dtype,
                  needs_grad(*maps, bias, scale, shift), backend, maps=len(maps))
    return impl.run(list(maps), hws, size, bias, scale, shift, relu)
