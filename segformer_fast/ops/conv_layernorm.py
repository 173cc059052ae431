"""Strided conv + LayerNorm over channels, tokens out (patch embedding and sequence reduction).

``conv_layernorm(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, hw=None)``:
x is an image (B, Cin, H, W) or tokens (B, N, Cin) with ``hw=(H, W)``; returns
(tokens (B, H'*W', Cout), (H', W')). Implementations (``segformer_fast.backends``):

- ``triton``: one implicit-GEMM kernel with the LayerNorm in its epilogue (forward) and one that
  recomputes the conv tile and applies the LayerNorm backward (writing d(conv output) and the
  dgamma/dbeta/dbias partials); d(input) and d(weight) are ``aten.convolution_backward``.
- ``cuda``: the CUDA C++ twin of the triton pair (csrc/cuda/conv_layernorm.cu, Cout <= 512): nvcc
  build on CUDA tensors; on CPU tensors the CUDA emulation, when ``SEGFORMER_FAST_CUDA_EMULATE=1``
  and ``cuda`` is named. Same backward split (d(input)/d(weight) through ``convolution_backward``).
- ``torch``: conv2d on the channels-last view of the tokens (no transpose copy), layer_norm on the
  token view of a channels-last conv output (no copy either).
- ``reference``: ``segformer_fast.reference.conv_layernorm``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference as _reference
from ..backends import GPU_FLOATS, Impl, Inputs, register, triton_impl
from ._common import autocast_policy, choose, cuda_limits, needs_grad, register_autocast, size_pair

__all__ = ["conv_layernorm"]


def _pair(v, name: str) -> tuple:
    return size_pair(v, name, "conv_layernorm")


def _check(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, hw):
    """All input checks, before any launch. Returns (x as 4D (B, Cin, H, W) view, stride, padding)."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"conv_layernorm: x and weight must be tensors, got {type(x).__name__} and "
                        f"{type(weight).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"conv_layernorm: x must be a floating-point tensor, got dtype {x.dtype}")
    if weight.dim() != 4:
        raise ValueError(f"conv_layernorm: weight must be (Cout, Cin, kh, kw), got shape {tuple(weight.shape)}")
    Cout, Cin_w, KH, KW = weight.shape
    named = {"weight": weight, "bias": bias, "norm_weight": norm_weight, "norm_bias": norm_bias}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"conv_layernorm: {name} must be a tensor or None, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"conv_layernorm: {name} dtype {t.dtype} differs from x dtype {x.dtype} "
                            "(all tensors must share one floating dtype)")
        if t.device != x.device:
            raise ValueError(f"conv_layernorm: {name} is on {t.device} but x is on {x.device}")
        if name != "weight" and tuple(t.shape) != (Cout,):
            raise ValueError(f"conv_layernorm: {name} must have shape ({Cout},) (Cout of weight), "
                             f"got {tuple(t.shape)}")
    stride = _pair(stride, "stride")
    padding = _pair(padding, "padding")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"conv_layernorm: stride must be >= 1 and padding >= 0, got stride {stride}, "
                         f"padding {padding}")
    if not isinstance(eps, (float, int)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"conv_layernorm: eps must be a non-negative number, got {eps!r}")
    if x.dim() == 3:
        if hw is None:
            raise ValueError("conv_layernorm: token input (B, N, Cin) needs hw=(H, W)")
        H, W = _pair(hw, "hw")
        B, N, C = x.shape
        if H * W != N:
            raise ValueError(f"conv_layernorm: hw={(H, W)} gives H*W={H * W} but x has N={N} tokens")
        # (B, N, C) tokens are channels-last (B, C, H, W) memory: a strided view, never a copy
        x4 = x.view(B, H, W, C).permute(0, 3, 1, 2) if x.is_contiguous() else \
            x.reshape(B, H, W, C).permute(0, 3, 1, 2)
    elif x.dim() == 4:
        if hw is not None and tuple(hw) != tuple(x.shape[-2:]):
            raise ValueError(f"conv_layernorm: hw={tuple(hw)} given for an image of size {tuple(x.shape[-2:])}")
        x4 = x
    else:
        raise ValueError(f"conv_layernorm: x must be an image (B, Cin, H, W) or tokens (B, N, Cin), "
                         f"got rank {x.dim()} shape {tuple(x.shape)}")
    if x4.shape[1] != Cin_w:
        raise ValueError(f"conv_layernorm: x has {x4.shape[1]} input channels but weight expects {Cin_w} "
                         f"(weight shape {tuple(weight.shape)})")
    H, W = x4.shape[-2:]
    if H + 2 * padding[0] < KH or W + 2 * padding[1] < KW:
        raise ValueError(f"conv_layernorm: input {(H, W)} with padding {padding} is smaller than the "
                         f"kernel {(KH, KW)}")
    return x4, stride, padding


def _out_hw(x4: Tensor, weight: Tensor, stride, padding) -> tuple[int, int]:
    H, W = x4.shape[-2:]
    KH, KW = weight.shape[-2:]
    return (H + 2 * padding[0] - KH) // stride[0] + 1, (W + 2 * padding[1] - KW) // stride[1] + 1


# ---------------------------------------------------------------------------------------------
# torch.library custom ops (the triton path): forward and backward are each one opaque op with a
# fake implementation, so torch.compile traces the fused op without a graph break.

def _kernels():
    from ..kernels.triton import conv_layernorm as k
    return k


@torch.library.custom_op("segformer_fast::conv_layernorm", mutates_args=())
def _cl_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None,
            norm_bias: Tensor | None, stride: Sequence[int], padding: Sequence[int], eps: float) -> Tensor:
    return _kernels().conv_layernorm_fwd(x, weight, bias, norm_weight, norm_bias, tuple(stride),
                                         tuple(padding), eps)


@_cl_fwd.register_fake
def _fwd_fake(x, weight, bias, norm_weight, norm_bias, stride, padding, eps):
    Ho, Wo = _out_hw(x, weight, stride, padding)
    return x.new_empty((x.shape[0], Ho * Wo, weight.shape[0]))


@torch.library.custom_op("segformer_fast::conv_layernorm_backward", mutates_args=())
def _cl_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None,
            stride: Sequence[int], padding: Sequence[int], eps: float,
            need_input: bool, need_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx or empty, dweight or empty, (3, Cout) stacked [dbias, dgamma, dbeta])."""
    k = _kernels()
    dz, dgamma, dbeta, dbias = k.conv_layernorm_bwd_dz(dy, x, weight, bias, norm_weight, tuple(stride),
                                                       tuple(padding), eps)
    dx, dw = _input_weight_grads(dz, x, weight, stride, padding, need_input, need_weight)
    return dx, dw, torch.stack((dbias, dgamma, dbeta)).to(x.dtype)


def _input_weight_grads(dz: Tensor, x: Tensor, weight: Tensor, stride, padding, need_input: bool,
                        need_weight: bool) -> tuple[Tensor, Tensor]:
    """d(input) and d(weight) from d(conv output) ``dz`` (B, H'W', Cout) tokens (empty tensors for
    those not needed): the tail shared by the triton and cuda backwards."""
    B, Cout = x.shape[0], weight.shape[0]
    Ho, Wo = _out_hw(x, weight, stride, padding)
    dx = dw = None
    if need_input or need_weight:
        # d(input) and d(weight) of a conv are two plain GEMM-shaped convolutions with nothing left
        # to fuse (the LayerNorm backward and dbias already are): cuDNN's implicit-GEMM kernels run
        # them at tensor-core speed, reading dz in its channels-last token layout without a copy.
        dz4 = dz.view(B, Ho, Wo, Cout).permute(0, 3, 1, 2)
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dz4, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
            [need_input, need_weight, False])
    dx = dx.contiguous(memory_format=_same_format(x)) if dx is not None else x.new_empty(0)
    dw = dw if dw is not None else weight.new_empty(0)
    return dx, dw


def _same_format(x: Tensor):
    return torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                   and x.is_contiguous(memory_format=torch.channels_last)) \
        else torch.contiguous_format


@_cl_bwd.register_fake
def _bwd_fake(dy, x, weight, bias, norm_weight, stride, padding, eps, need_input, need_weight):
    Cout = weight.shape[0]
    dx = torch.empty_like(x, memory_format=_same_format(x)) if need_input else x.new_empty(0)
    dw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    return dx, dw, x.new_empty((3, Cout))


def _setup_context(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, stride, padding, eps = inputs
    ctx.save_for_backward(x, weight, bias, norm_weight)
    ctx.has = (bias is not None, norm_weight is not None, norm_bias is not None)
    ctx.conf = (tuple(stride), tuple(padding), eps)


def _backward_with(bwd_op):
    """The autograd backward of a forward op whose backward op is ``bwd_op`` (triton or cuda)."""
    def backward(ctx, dy):
        x, weight, bias, norm_weight = ctx.saved_tensors
        stride, padding, eps = ctx.conf
        need = ctx.needs_input_grad
        dx, dw, dvec = bwd_op(dy, x, weight, bias, norm_weight, stride, padding, eps,
                              bool(need[0]), bool(need[1]))
        dbias, dgamma, dbeta = dvec.unbind(0)
        has_b, has_g, has_be = ctx.has
        return (dx if need[0] else None, dw if need[1] else None,
                dbias if (has_b and need[2]) else None, dgamma if (has_g and need[3]) else None,
                dbeta if (has_be and need[4]) else None, None, None, None)
    return backward


_cl_fwd.register_autograd(_backward_with(_cl_bwd), setup_context=_setup_context)
register_autocast(_cl_fwd, "lower")
register_autocast(_cl_bwd, "keep")


# ---------------------------------------------------------------------------------------------
# cuda: the CUDA C++ twin (csrc/cuda/conv_layernorm.cu), own op names so that traced graphs say
# which kernels they call; the same fakes, autograd and autocast policy as the triton pair.

@torch.library.custom_op("segformer_fast::cuda_conv_layernorm", mutates_args=())
def _cuda_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None,
              norm_bias: Tensor | None, stride: Sequence[int], padding: Sequence[int], eps: float) -> Tensor:
    from ..kernels.cuda import conv_layernorm_fwd
    return conv_layernorm_fwd(x, weight, bias, norm_weight, norm_bias, tuple(stride), tuple(padding), eps)


@torch.library.custom_op("segformer_fast::cuda_conv_layernorm_backward", mutates_args=())
def _cuda_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None,
              stride: Sequence[int], padding: Sequence[int], eps: float,
              need_input: bool, need_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx or empty, dweight or empty, (3, Cout) stacked [dbias, dgamma, dbeta])."""
    from ..kernels.cuda import conv_layernorm_bwd_dz
    dz, dvec = conv_layernorm_bwd_dz(dy, x, weight, bias, norm_weight, tuple(stride), tuple(padding), eps)
    dx, dw = _input_weight_grads(dz, x, weight, stride, padding, need_input, need_weight)
    return dx, dw, dvec.to(x.dtype)


_cuda_fwd.register_fake(_fwd_fake)
_cuda_bwd.register_fake(_bwd_fake)
_cuda_fwd.register_autograd(_backward_with(_cuda_bwd), setup_context=_setup_context)
register_autocast(_cuda_fwd, "lower")
register_autocast(_cuda_bwd, "keep")


# ---------------------------------------------------------------------------------------------

def _torch_path(x4, weight, bias, norm_weight, norm_bias, stride, padding, eps):
    """Stock ops, no layout copies: conv2d on the channels-last view gives a channels-last output,
    whose (B, H'W', Cout) token view is contiguous, which layer_norm reads as is."""
    if x4.dim() == 4 and not x4.is_contiguous(memory_format=torch.channels_last):
        # the 3-channel image: a channels-last copy of it is smaller than the conv output whose
        # transpose it avoids (3*H*W vs Cout*H*W/16 elements: 3 vs 2..4 for the stem)
        x4 = x4.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x4, weight, bias, stride, padding)
    B, Cout, Ho, Wo = y.shape
    t = y.permute(0, 2, 3, 1).reshape(B, Ho * Wo, Cout)   # a view for channels-last y
    return F.layer_norm(t, (Cout,), norm_weight, norm_bias, eps)


def _run_triton(x4, weight, bias, norm_weight, norm_bias, stride, padding, eps):
    return _cl_fwd(x4, weight, bias, norm_weight, norm_bias, list(stride), list(padding), eps)


def _run_reference(x4, weight, bias, norm_weight, norm_bias, stride, padding, eps):
    return _reference.conv_layernorm(x4, weight, bias, norm_weight, norm_bias, stride, padding, eps)[0]


def _run_cuda(x4, weight, bias, norm_weight, norm_bias, stride, padding, eps):
    return _cuda_fwd(x4, weight, bias, norm_weight, norm_bias, list(stride), list(padding), eps)


_CUDA_MAX_COUT = 512     # a block owns whole rows of Cout (SegFormer's widest stage: 512)


def _cuda_limits(inputs: Inputs) -> list[str]:
    cout = inputs.facts.get("cout")
    why = []
    if cout is not None and cout > _CUDA_MAX_COUT:
        why.append(f"Cout {cout} > {_CUDA_MAX_COUT} (a block owns whole rows of Cout)")
    return cuda_limits(inputs, why)


IMPLS = register("conv_layernorm", [
    triton_impl(_run_triton),
    Impl("cuda", _run_cuda, devices=("cuda", "cpu"), dtypes=GPU_FLOATS, limits=_cuda_limits),
    Impl("torch", _torch_path, onnx=True),
    Impl("reference", _run_reference, onnx=True),
])


@autocast_policy
def conv_layernorm(x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None,
                   norm_bias: Tensor | None, stride, padding, eps: float,
                   hw: tuple[int, int] | None = None, *, backend: str | None = None
                   ) -> tuple[Tensor, tuple[int, int]]:
    """Strided conv + LayerNorm over output channels, written as tokens.

    x: image (B, Cin, H, W), or tokens (B, N, Cin) with ``hw=(H, W)`` and N = H*W (read in place:
    no transpose; H, W may be SymInts while tracing). weight (Cout, Cin, kh, kw); bias, norm_weight,
    norm_bias (Cout,) or None; stride, padding: int or pair; eps: the LayerNorm's eps. Output size
    by the floor formula. Under autocast all tensors run in the autocast dtype (LayerNorm
    statistics stay fp32). ``backend``: None (process-wide choice) or a backend name.
    Returns (tokens (B, H'*W', Cout), (H', W')). Differentiable in every tensor argument.
    """
    x4, stride, padding = _check(x, weight, bias, norm_weight, norm_bias, stride, padding, eps, hw)
    impl = choose("conv_layernorm", x.device, x.dtype,
                  needs_grad(x, weight, bias, norm_weight, norm_bias), backend, cout=weight.shape[0])
    out = impl.run(x4, weight, bias, norm_weight, norm_bias, stride, padding, float(eps))
    return out, _out_hw(x4, weight, stride, padding)
