"""What every public op shares: its autocast policy, size checks that accept symbolic sizes, and
the call into the dispatcher.

Autocast policy (every op, every implementation): under ``torch.autocast`` on the tensors' device
type, floating tensors other than fp64 (activations *and* fp32 parameters) are cast to the autocast
dtype, as stock conv/linear/SDPA do, and the op runs in that dtype with autocast off inside (its
statistics and accumulations are fp32 by the numerics contract, whatever the I/O dtype). Gradients
flow back through the casts, so fp32 parameters get fp32 gradients.

The torch.library custom ops carry the same policy for traced graphs (``register_autocast``): a
forward op casts its floating inputs to the autocast dtype; a backward op runs as given (its inputs
are the forward's saved tensors and fp32 statistics, which must not be recast); the fp32-only native
CPU op runs in fp32 and returns the autocast dtype.
"""
from __future__ import annotations

import functools
import operator

import torch
from torch import Tensor

from .. import backends


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, Tensor):
        if value.is_floating_point() and value.dtype != torch.float64 and value.device.type == device_type:
            return value.to(dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def _first_tensor(values):
    for v in values:
        if isinstance(v, Tensor):
            return v
        if isinstance(v, (list, tuple)):
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def autocast_policy(fn):
    """Decorator giving a public op the autocast policy above (a no-op outside autocast)."""
    @functools.wraps(fn)
    def op(*args, **kwargs):
        t = _first_tensor(args)
        if t is None or t.device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(t.device.type):
            return fn(*args, **kwargs)
        device_type = t.device.type
        dtype = torch.get_autocast_dtype(device_type)
        args = _cast(args, device_type, dtype)
        kwargs = {k: _cast(v, device_type, dtype) for k, v in kwargs.items()}
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)
    return op


_LIB = torch.library.Library("segformer_fast", "IMPL")   # kept alive: owns the autocast kernels


def register_pair(fwd, bwd, fwd_fake, bwd_fake, backward, setup_context) -> None:
    """Fakes, autograd and autocast of one forward/backward custom-op pair (a kernel backend):
    the forward casts under autocast, the backward runs in the dtypes autograd hands it."""
    fwd.register_fake(fwd_fake)
    bwd.register_fake(bwd_fake)
    fwd.register_autograd(backward, setup_context=setup_context)
    register_autocast(fwd, "lower")
    register_autocast(bwd, "keep")


def register_autocast(op, policy: str) -> None:
    """Register ``op``'s autocast kernels (CPU and CUDA). ``policy``: "lower" (cast floating inputs
    to the autocast dtype: forward ops), "keep" (run as given: backward ops), "fp32" (run in fp32,
    return the autocast dtype: the fp32-only native CPU kernel)."""
    overload = op._opoverload
    name = op._name
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device=device_type, _keyset_off=keyset):
            dtype = torch.get_autocast_dtype(_device)
            with torch._C._ExcludeDispatchKeyGuard(_keyset_off):
                if policy == "lower":
                    return overload(*_cast(args, _device, dtype))
                if policy == "fp32":
                    return _cast(overload(*_cast(args, _device, torch.float32)), _device, dtype)
                return overload(*args)
        _LIB.impl(name, kernel, key, with_keyset=True)


def size(v, what: str, op: str):
    """A size argument as given (int, or a SymInt while tracing: never specialised by ``int()``);
    numpy/other integer types become ints; anything else is a TypeError naming the value."""
    if isinstance(v, torch.SymInt):
        return v
    if isinstance(v, bool):
        raise TypeError(f"{op}: {what} must be an int, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{op}: {what} must be an int, got {v!r}") from None


def size_pair(v, what: str, op: str) -> tuple:
    """An (H, W)-like pair of sizes; an int means (v, v)."""
    if isinstance(v, (tuple, list, torch.Size)):
        if len(v) != 2:
            raise TypeError(f"{op}: {what} must be an int or a pair of ints, got {v!r}")
        return size(v[0], what, op), size(v[1], what, op)
    try:
        s = size(v, what, op)
    except TypeError:
        raise TypeError(f"{op}: {what} must be an int or a pair of ints, got {v!r}") from None
    return s, s


def needs_grad(*tensors) -> bool:
    """Whether autograd will need this call's backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def choose(op: str, device: torch.device, dtype: torch.dtype, grad: bool, backend: str | None,
           **facts) -> backends.Impl:
    """The implementation that runs this call (see ``segformer_fast.backends``)."""
    return backends.select(op, backends.Inputs(device, dtype, grad, backends.requested(backend), facts))


def cuda_limits(inputs: backends.Inputs, why: list[str] | None = None) -> list[str]:
    """Reasons the ``cuda`` implementation cannot run ``inputs``, after the op's own shape limits
    ``why``: on CPU tensors the CUDA emulation runs only when ``cuda`` is named (never for ``auto``),
    and the build for the tensors' device must be possible here."""
    why = list(why or [])
    if inputs.device.type == "cpu" and inputs.requested == "auto":
        why.append("the CUDA emulation is a correctness tool: CPU tensors run it only when 'cuda' is "
                   "asked for by name")
    elif not why and inputs.dtype in backends.GPU_FLOATS:
        from ..kernels.cuda import build_problem
        problem = build_problem(inputs.device.type)
        if problem:
            why.append(problem)
    return why
