"""Mix-FFN core: depthwise 3x3 conv + bias + GELU on (B, N, C) tokens, one pass, no transposes.

``dwconv_gelu(x, hw, weight, bias, approximate="none", *, backend=None)``; see the function.

Implementations (``segformer_fast.backends``): ``triton`` (fused kernels, a ``torch.library``
custom op with fake, autograd and autocast registrations), ``torch`` (channels-last depthwise conv
on a zero-copy NCHW view of the tokens + GELU: no layout copy), ``reference``
(``segformer_fast.reference.dwconv_gelu``), ``cuda`` (the CUDA C++ twin of the Triton kernels,
csrc/cuda/dwconv_gelu.cu: nvcc build on CUDA tensors; on CPU tensors the CUDA emulation, when
``SEGFORMER_FAST_CUDA_EMULATE=1`` and ``cuda`` is named).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..backends import GPU_FLOATS, Impl, register, triton_impl
from ._common import autocast_policy, choose, cuda_limits, needs_grad, register_pair, size_pair

__all__ = ["dwconv_gelu"]

_APPROX = ("none", "tanh")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(x, hw, weight, bias, approximate) -> tuple[int, int]:
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"dwconv_gelu: x and weight must be tensors, got {type(x).__name__} and "
                        f"{type(weight).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"dwconv_gelu: bias must be a tensor or None, got {type(bias).__name__}")
    if approximate not in _APPROX:
        raise ValueError(f"dwconv_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    if x.dim() != 3:
        raise ValueError(f"dwconv_gelu: x must be tokens (B, N, C), got shape {tuple(x.shape)}")
    if not isinstance(hw, (tuple, list, torch.Size)):
        raise TypeError(f"dwconv_gelu: hw must be a pair of ints (H, W), got {hw!r}")
    H, W = size_pair(hw, "hw", "dwconv_gelu")
    B, N, C = x.shape
    if H <= 0 or W <= 0 or H * W != N:
        raise ValueError(f"dwconv_gelu: hw=({H}, {W}) gives H*W={H * W} tokens but x has N={N} "
                         f"(x shape {tuple(x.shape)})")
    if tuple(weight.shape) != (C, 1, 3, 3):
        raise ValueError(f"dwconv_gelu: weight must be (C, 1, 3, 3) = ({C}, 1, 3, 3) for a depthwise "
                         f"3x3 conv, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"dwconv_gelu: bias must be (C,) = ({C},), got {tuple(bias.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"dwconv_gelu: x must be a floating tensor (float32/float16/bfloat16/float64), "
                        f"got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"dwconv_gelu: {name} dtype {t.dtype} does not match x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"dwconv_gelu: {name} is on {t.device} but x is on {x.device}")
    return H, W


# ---------------------------------------------------------------------------------------------
# torch backend: the tokens ARE a channels-last NCHW tensor, so conv2d runs on a view.

def _as_nchw(x: Tensor, H: int, W: int) -> Tensor:
    B, N, C = x.shape
    # (B, H*W, C) -> (B, H, W, C) is a view for contiguous tokens; permuting gives an NCHW tensor
    # whose memory is channels_last, which the mkldnn/cuDNN depthwise kernels take as it is.
    return x.reshape(B, H, W, C).permute(0, 3, 1, 2)


def _torch_impl(x: Tensor, H: int, W: int, weight: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    B, N, C = x.shape
    y = F.conv2d(_as_nchw(x, H, W), weight, bias, stride=1, padding=1, groups=C)
    # A channels-last conv output (B, C, H, W) permuted back is contiguous (B, H, W, C) memory:
    # the reshape to tokens is a view. (Only if a conv kernel ever returned NCHW memory would
    # this reshape copy.)
    y = y.permute(0, 2, 3, 1).reshape(B, N, C)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return F.gelu(y, approximate=approximate)
    # Inference: GELU in place on the fresh conv output, no second allocation.
    return torch.ops.aten.gelu_(y, approximate=approximate)


# ---------------------------------------------------------------------------------------------
# triton backend: custom ops (so torch.compile traces without a graph break) + autograd.

def _setup_context(ctx, inputs, output):
    x, H, W, weight, bias, approximate = inputs
    # Only the inputs: the pre-activation is recomputed in the backward (it re-reads x anyway).
    ctx.save_for_backward(x, weight, bias)
    ctx.H, ctx.W, ctx.approximate = H, W, approximate


def _bwd_fake(grad, x, H, W, weight, bias, approximate):
    C = x.shape[-1]
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((C,)) if bias is None else bias.new_empty(bias.shape))


def _opt(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _kernel_ops(name: str, launchers):
    """The forward/backward custom ops of one kernel backend: ``launchers()`` returns its
    (forward, backward) launchers, looked up at call time. Each backend gets its own op names
    (``segformer_fast::dwconv_gelu``, ``segformer_fast::cuda_dwconv_gelu``) so traced graphs say
    which kernels they call; fakes, autograd and autocast are the same."""
    @torch.library.custom_op(f"segformer_fast::{name}", mutates_args=())
    def fwd(x: Tensor, H: int, W: int, weight: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
        return launchers()[0](x.contiguous(), H, W, weight.contiguous(), _opt(bias), approximate)

    @torch.library.custom_op(f"segformer_fast::{name}_backward", mutates_args=())
    def bwd(grad: Tensor, x: Tensor, H: int, W: int, weight: Tensor, bias: Tensor | None,
            approximate: str) -> tuple[Tensor, Tensor, Tensor]:
        return launchers()[1](grad.contiguous(), x.contiguous(), H, W, weight.contiguous(), _opt(bias),
                              approximate)

    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = bwd(grad, x, ctx.H, ctx.W, weight, bias, ctx.approximate)
        return dx, None, None, dw, (db if bias is not None else None), None

    register_pair(fwd, bwd, lambda x, H, W, weight, bias, approximate: x.new_empty(x.shape), _bwd_fake, backward, _setup_context)
    return fwd


def _triton_launchers():
    from ..kernels.triton import dwconv_gelu as k
    return k.forward, k.backward


def _cuda_launchers():          # the CUDA C++ twin, csrc/cuda/dwconv_gelu.cu
    from ..kernels.cuda import dwconv_gelu_bwd, dwconv_gelu_fwd
    return dwconv_gelu_fwd, dwconv_gelu_bwd


_dwconv_gelu_op = _kernel_ops("dwconv_gelu", _triton_launchers)
_cuda_fwd = _kernel_ops("cuda_dwconv_gelu", _cuda_launchers)


# ---------------------------------------------------------------------------------------------

def _reference(x, H, W, weight, bias, approximate):
    return reference.dwconv_gelu(x, (H, W), weight, bias, approximate)


IMPLS = register("dwconv_gelu", [
    triton_impl(_dwconv_gelu_op),
    Impl("cuda", _cuda_fwd, devices=("cuda", "cpu"), dtypes=GPU_FLOATS, limits=cuda_limits),
    Impl("torch", _torch_impl, onnx=True),
    Impl("reference", _reference, onnx=True),
])


@autocast_policy
def dwconv_gelu(x: Tensor, hw: tuple[int, int], weight: Tensor, bias: Tensor | None,
                approximate: str = "none", *, backend: str | None = None) -> Tensor:
    """Depthwise 3x3 conv (stride 1, zero padding 1) + bias + GELU on tokens, tokens out.

    x: (B, N, C) tokens with N = H*W in row-major order (``flatten(2).transpose(1, 2)`` of an
    NCHW map); hw = (H, W) (ints, or SymInts while tracing); weight (C, 1, 3, 3); bias (C,) or
    None; approximate "none" (exact erf GELU) or "tanh". Same dtype and device for all tensors
    (under autocast all run in the autocast dtype). Returns (B, N, C), equal to
    ``segformer_fast.reference.dwconv_gelu``. ``backend`` pins an implementation (default: the
    process-wide choice, see ``segformer_fast.backends``). Differentiable in x, weight, bias.
    """
    H, W = _check(x, hw, weight, bias, approximate)
    impl = choose("dwconv_gelu", x.device, x.dtype, needs_grad(x, weight, bias), backend)
    return impl.run(x, H, W, weight, bias, approximate)
