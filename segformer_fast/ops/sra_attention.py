"""Public op: spatial-reduction attention (many queries, few keys) without the N x M matrix.

``sra_attention(q, k, v, num_heads, scale=None)``: q (B, N, C), k and v (B, M, C) → (B, N, C).
Implementations (``segformer_fast.backends``): ``triton`` (flash-style kernels, head dim <= 128:
one head's K/V tile stays on chip), ``cuda`` (the CUDA C++ twin of the Triton kernels, head dim
<= 128: nvcc build on CUDA tensors; on CPU tensors the CUDA emulation, when
``SEGFORMER_FAST_CUDA_EMULATE=1`` and ``cuda`` is named), ``cpu`` (bf16 inference on CPUs with
AVX512-BF16, head dim a multiple of 32 up to 128: csrc/cpu/sra_attention.cpp, both products on
VDPBF16PS with the softmax in cache between them; 2.2x PyTorch's bf16 SDPA at SegFormer's shapes on
the 2-core AVX-512 machine; ``auto`` takes ``torch`` for every other call), ``torch``
(``scaled_dot_product_attention`` on strided head views, any head dim), ``reference``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..backends import GPU_FLOATS, Impl, Inputs, needs_native_cpu, register, triton_impl
from ._common import autocast_policy, choose, needs_grad, register_autocast, register_pair

__all__ = ["sra_attention"]

_TRITON_MAX_HEAD_DIM = 128


def _check(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"sra_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"sra_attention: {name} must have rank 3 (B, tokens, C), got shape "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"sra_attention: {name} must be floating point, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"sra_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"sra_attention: q, k, v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    B, N, C = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"sra_attention: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != C or v.shape[2] != C:
        raise ValueError(f"sra_attention: channels differ: q {C}, k {k.shape[2]}, v {v.shape[2]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"sra_attention: k and v must have the same number of tokens M, got "
                         f"{k.shape[1]} and {v.shape[1]}")
    if k.shape[1] < 1:
        raise ValueError("sra_attention: need at least one key (M >= 1), got M = 0")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise TypeError(f"sra_attention: num_heads must be a positive int, got {num_heads!r}")
    if C % num_heads:
        raise ValueError(f"sra_attention: C = {C} is not divisible by num_heads = {num_heads}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"sra_attention: scale must be a float or None, got {type(scale).__name__}")


def _channels_contiguous(t: Tensor) -> Tensor:
    # every kernel (Triton, CUDA, native CPU) reads rows by stride but needs the channel dim
    # contiguous (kv halves already are)
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------- kernel backends: custom ops
def _fwd_fake(q, k, v, num_heads, scale):
    B, N, C = q.shape
    return q.new_empty((B, N, C)), q.new_empty((B * num_heads, N), dtype=torch.float32)


def _bwd_fake(do, q, k, v, lse, num_heads, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, num_heads, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, lse)    # the fp32 row LSE replaces P; O is not needed
    ctx.mark_non_differentiable(lse)
    ctx.num_heads, ctx.scale = num_heads, scale


def _kernel_ops(prefix: str, launchers):
    """The forward/backward custom ops of one kernel backend: ``launchers()`` returns its
    (forward, backward) launchers, both with the Triton kernels' contract (O and the fp32 row LSE;
    deterministic dK/dV). Each backend gets its own op names (``segformer_fast::sra_attention_fwd``,
    ``segformer_fast::cuda_sra_attention_fwd``) so traced graphs say which kernels they call;
    fakes, autograd and autocast are the same."""
    @torch.library.custom_op(f"segformer_fast::{prefix}sra_attention_fwd", mutates_args=())
    def fwd(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
        return launchers()[0](*map(_channels_contiguous, (q, k, v)), num_heads, scale)

    @torch.library.custom_op(f"segformer_fast::{prefix}sra_attention_bwd", mutates_args=())
    def bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, num_heads: int,
            scale: float) -> tuple[Tensor, Tensor, Tensor]:
        return launchers()[1](*map(_channels_contiguous, (do, q, k, v)), lse, num_heads, scale)

    def backward(ctx, do, dlse):
        q, k, v, lse = ctx.saved_tensors
        dq, dk, dv = bwd(do, q, k, v, lse, ctx.num_heads, ctx.scale)
        return dq, dk, dv, None, None

    register_pair(fwd, bwd, _fwd_fake, _bwd_fake, backward, _setup_context)
    return fwd


def _triton_launchers():
    from ..kernels.triton.sra_attention import sra_attention_bwd, sra_attention_fwd
    return sra_attention_fwd, sra_attention_bwd


def _cuda_launchers():          # the CUDA C++ kernels of csrc/cuda/sra_attention.cu
    from ..kernels.cuda import sra_attention_bwd, sra_attention_fwd
    return sra_attention_fwd, sra_attention_bwd


_sra_fwd = _kernel_ops("", _triton_launchers)
_cuda_fwd = _kernel_ops("cuda_", _cuda_launchers)


# ---------------------------------------------------------------- torch: stock SDPA
def _torch_sdpa(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float) -> Tensor:
    B, N, C = q.shape
    d = C // num_heads
    # (B, tokens, H, d) -> (B, H, tokens, d) are strided views (no copy; kv halves stay views)
    qh = q.unflatten(2, (num_heads, d)).transpose(1, 2)
    kh = k.unflatten(2, (num_heads, d)).transpose(1, 2)
    vh = v.unflatten(2, (num_heads, d)).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    # SDPA's CPU/CUDA flash kernels allocate the output as (B, N, H, d): this reshape is a view
    return out.transpose(1, 2).reshape(B, N, C)


# ---------------------------------------------------------------- cpu: native bf16 kernel
@torch.library.custom_op("segformer_fast::sra_attention_cpu", mutates_args=())
def _sra_attention_cpu(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float) -> Tensor:
    # a custom op, so torch.compile keeps the native call in its graph instead of breaking there
    from ..kernels.cpu import native
    return native().sra_attention_bf16_forward(q, k, v, num_heads, scale)


@_sra_attention_cpu.register_fake
def _(q, k, v, num_heads, scale):
    return q.new_empty(q.shape)


register_autocast(_sra_attention_cpu, "lower")


def _run_cpu(q, k, v, num_heads, scale):
    return _sra_attention_cpu(*map(_channels_contiguous, (q, k, v)), num_heads, scale)


def _cpu_limits(inputs: Inputs) -> list[str]:
    d = inputs.facts.get("head_dim")
    if d is not None and (d % 32 or d > 128):
        return [f"head dim {d} is not a multiple of 32 up to 128 (the kernel's register tiles)"]
    return []


@torch.compiler.assume_constant_result     # a fact about the machine: dynamo must not trace it
def _bf16_dot() -> bool:
    from ..kernels.cpu import native
    return native().cpu_has_bf16_dot()


def _needs_bf16_dot() -> str | None:
    missing = needs_native_cpu()
    if missing:
        return missing
    if not _bf16_dot():
        return "this CPU has no AVX512-BF16 (or SEGFORMER_FAST_CPU_ISA=portable)"
    return None


def _run_triton(q, k, v, num_heads, scale):
    return _sra_fwd(q, k, v, num_heads, scale)[0]


def _run_torch(q, k, v, num_heads, scale):
    M = k.shape[1]
    # M == 1 (tiny inputs): the score "matrix" is N x 1, and SDPA's fused backward gives dq
    # rounding noise where the exact gradient is 0 (softmax over one key is constant). A
    # symbolic M (torch.export / compile with dynamic shapes) takes SDPA: branching on it would
    # guard the traced program to one side of M > 1.
    if not isinstance(M, int) or M > 1:
        return _torch_sdpa(q, k, v, num_heads, scale)
    return reference.sra_attention(q, k, v, num_heads, scale)


def _run_cuda(q, k, v, num_heads, scale):
    return _cuda_fwd(q, k, v, num_heads, scale)[0]


def _triton_limits(inputs: Inputs) -> list[str]:
    d = inputs.facts.get("head_dim")
    if d is not None and d > _TRITON_MAX_HEAD_DIM:
        return [f"head dim {d} > {_TRITON_MAX_HEAD_DIM} (one head's K/V tile must fit on chip)"]
    return []


def _cuda_limits(inputs: Inputs) -> list[str]:
    why = _triton_limits(inputs)        # the same on-chip K/V tiles: head dim <= 128
    if inputs.device.type == "cpu" and inputs.requested == "auto":
        why.append("the CUDA emulation is a correctness tool: CPU tensors run it only when 'cuda' is "
                   "asked for by name")
    elif not why and inputs.dtype in GPU_FLOATS:
        from ..kernels.cuda import build_problem
        problem = build_problem(inputs.device.type)
        if problem:
            why.append(problem)
    return why


IMPLS = register("sra_attention", [
    triton_impl(_run_triton, _triton_limits),
    Impl("cuda", _run_cuda, devices=("cuda", "cpu"), dtypes=GPU_FLOATS, limits=_cuda_limits),
    Impl("cpu", _run_cpu, devices=("cpu",), dtypes=(torch.bfloat16,), backward=False, limits=_cpu_limits,
         requires=_needs_bf16_dot),
    Impl("torch", _run_torch, onnx=True),
    Impl("reference", reference.sra_attention, onnx=True),
])


@autocast_policy
def sra_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float | None = None, *,
                  backend: str | None = None) -> Tensor:
    """Multi-head attention of N queries over M (spatially reduced) keys, never forming N x M.

    q: (B, N, C); k, v: (B, M, C) (k and v may be column halves of one (B, M, 2C) tensor: any
    row stride works, only the channel dim must be contiguous). Head h owns channels
    h*d ... (h+1)*d, d = C // num_heads (the triton and cuda implementations take d <= 128, the
    bf16-only cpu kernel d a multiple of 32 up to 128, the others any d); ``scale`` defaults to d**-0.5. Softmax statistics and accumulations are fp32 for every
    input dtype; fp32 inputs use IEEE dot products. Under autocast all tensors run in the autocast
    dtype. ``backend`` pins one implementation (default: the process-wide choice).
    Returns (B, N, C) in q's dtype.
    """
    _check(q, k, v, num_heads, scale)
    d = q.shape[2] // num_heads
    scale = float(d ** -0.5 if scale is None else scale)
    impl = choose("sra_attention", q.device, q.dtype, needs_grad(q, k, v), backend, head_dim=d)
    return impl.run(q, k, v, num_heads, scale)
