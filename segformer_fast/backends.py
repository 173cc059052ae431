"""Which implementation runs an op.

Names:
- ``auto``: the fastest available for the tensor's device: ``triton`` on CUDA tensors; on CPU
  tensors ``cpu`` where an op has a native CPU kernel (and it builds), ``torch`` otherwise (a CPU
  run through the Triton interpreter is a correctness tool, never a default).
- ``triton``: the fused Triton kernels. On CPU tensors this needs ``TRITON_INTERPRET=1`` set before
  segformer_fast's kernel modules are imported.
- ``cpu``: the native C++ kernels of ``csrc/cpu`` where an op has one (built on first use, see
  ``_build.py``), the ``torch`` composition for the rest.
- ``cuda``: the native CUDA kernels of ``csrc/cuda`` (none yet: asking for them raises).
- ``torch``: the best composition of stock PyTorch ops (SDPA, channels-last convs, the folded
  decoder) — the fast path on devices without a fused kernel.
- ``reference``: ``segformer_fast.reference``, the specification.

The process-wide choice comes from ``set_backend()`` or the ``SEGFORMER_FAST_BACKEND`` variable;
``patch(model, backend=...)`` pins one per module.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch", "reference")
_ENV = "SEGFORMER_FAST_BACKEND"
_current: str | None = None


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The process-wide backend name (``set_backend`` wins over ``SEGFORMER_FAST_BACKEND``)."""
    if _current is not None:
        return _current
    return _check_name(os.environ.get(_ENV, "auto"))


def set_backend(name: str) -> None:
    """Choose the process-wide backend: one of ``BACKENDS``."""
    global _current
    _current = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily set the process-wide backend (tests, benchmarks)."""
    global _current
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        _current = previous


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_native_cpu: dict = {}   # "ok": bool, "error": str — filled by the first call


@torch.compiler.assume_constant_result     # a fact about the machine: dynamo must not trace it
def native_cpu_available() -> bool:
    """Whether the native CPU kernels build (or are cached) here; warns once when they do not, in
    which case ``auto`` keeps to the ``torch`` composition."""
    if "ok" not in _native_cpu:
        try:
            from .kernels.cpu import native

            native()
            _native_cpu["ok"] = True
        except Exception as e:  # no compiler, no ninja, a read-only cache...: never fatal for auto
            _native_cpu.update(ok=False, error=f"{type(e).__name__}: {e}")
            warnings.warn("segformer_fast: native CPU kernels unavailable, using the torch backend "
                          f"({_native_cpu['error']})")
    return _native_cpu["ok"]


def resolve(device: torch.device, name: str | None = None, native_ops: tuple[str, ...] = ()) -> str:
    """The concrete backend that runs on ``device`` for the requested ``name``.

    ``native_ops`` lists backends that have a kernel for the op asking (e.g. ``("triton",)``).
    Raises a ValueError naming what was asked and why it cannot run, before any launch.
    """
    name = _check_name(name or get_backend())
    if name == "auto":
        if device.type == "cuda" and "triton" in native_ops and triton_available():
            return "triton"
        if device.type == "cpu" and "cpu" in native_ops and native_cpu_available():
            return "cpu"
        return "torch"
    if name in ("torch", "reference"):
        return name
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got device {device}")
        if "cpu" not in native_ops:
            return "torch"          # no native CPU kernel for this op: the stock composition
        if not native_cpu_available():  # explicit request: a failed build is an error, not a fallback
            raise RuntimeError(f"backend 'cpu': the native CPU kernels did not build "
                               f"({_native_cpu['error']})")
        return "cpu"
    if name not in native_ops:
        raise ValueError(f"backend {name!r} has no kernel for this op yet (available: "
                         f"{', '.join(('torch', 'reference') + tuple(native_ops))})")
    if name == "triton":
        if not triton_available():
            raise ValueError("backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(f"backend 'triton' needs CUDA tensors (got device {device}) or "
                             "TRITON_INTERPRET=1 set before segformer_fast is imported")
    return name
