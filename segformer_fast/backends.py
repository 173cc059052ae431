"""Which implementation runs an op: dispatch by declared capability.

Every public op (``segformer_fast.ops``) lists its implementations, each an :class:`Impl` that
declares the device types, dtypes and shape limits it handles, whether it has a backward, whether
it exports to ONNX, and what the machine must provide (``not_supported_reasons(inputs)`` turns
these into readable reasons). One dispatcher, :func:`select`, serves every op:

- ``auto`` takes the first implementation with no reasons, in the order of :data:`PRIORITY`:
  ``triton``, ``cuda``, ``cpu``, ``torch``, ``reference``. So CUDA tensors get the Triton kernels;
  CPU tensors the native C++ kernel where an op has one (fp32 inference: it has no backward) and the
  ``torch`` composition otherwise; a CPU run through the Triton interpreter is a correctness tool,
  never chosen by ``auto``. Under ``torch.onnx.export`` only stock-op compositions qualify (ONNX
  Runtime knows no segformer_fast ops), so ``auto`` gives ``torch``.
- A named backend runs that implementation or raises :class:`BackendUnavailable` before any launch,
  listing every implementation of the op with its reasons.

Names: ``triton`` (fused Triton kernels; CPU tensors need ``TRITON_INTERPRET=1`` set before the
kernel modules are imported), ``cuda`` (native CUDA kernels, where an op has them), ``cpu`` (native
C++ kernels of ``csrc/cpu`` where an op has one; for an op without one, ``cpu`` is declared as the
``torch`` composition on CPU tensors and ``auto`` names it ``torch``), ``torch`` (the best composition
of stock PyTorch ops: SDPA, channels-last convs, no layout copies), ``reference``
(``segformer_fast.reference``, the specification).

The process-wide choice comes from ``set_backend()`` or the ``SEGFORMER_FAST_BACKEND`` variable; a
``backend=`` argument (ops, ``patch``) pins one per call or module. :func:`which` says which
implementation an op would use for a device and dtype, and why the others were refused.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch", "reference")
PRIORITY = ("triton", "cuda", "cpu", "torch", "reference")   # the order ``auto`` tries
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
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


# ---------------------------------------------------------------------------------------------
# facts about the machine and the moment

def triton_interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
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


def onnx_exporting() -> bool:
    """Whether a ``torch.onnx.export`` is tracing right now."""
    return torch.onnx.is_in_onnx_export()


# ---------------------------------------------------------------------------------------------
# declared capabilities

@dataclass(frozen=True)
class Inputs:
    """What dispatch knows about one call: device, dtype, whether autograd needs a backward, the
    name asked for, and op-specific facts (``head_dim``, ``maps``...). A query without tensors
    (:func:`which`) leaves ``facts`` empty, and shape limits are then not judged."""
    device: torch.device
    dtype: torch.dtype
    needs_grad: bool = False
    requested: str = "auto"
    facts: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Impl:
    """One implementation of an op and what it can run.

    ``run`` takes the op's checked arguments. ``devices``: device types ("cuda", "cpu"), or
    ``None`` for any. ``limits(inputs) -> reasons`` holds op-specific shape limits (judged only for
    facts present in ``inputs.facts``); ``requires() -> reason or None`` what the machine must
    provide (a compiler, triton). ``same_as`` marks a declared alias (``cpu`` on an op without a
    native kernel runs the ``torch`` composition): it runs when named and ``auto`` skips it.
    """
    name: str
    run: Callable
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] = FLOATS
    backward: bool = True
    onnx: bool = False
    limits: Callable[[Inputs], list[str]] | None = None
    requires: Callable[[], str | None] | None = None
    same_as: str | None = None
    interpreter_on_cpu: bool = False    # Triton: CPU tensors through TRITON_INTERPRET=1

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        """Why this implementation cannot run ``inputs`` (empty: it can). Machine requirements
        are checked last, and only when nothing cheaper refused (building native code is slow)."""
        why = []
        dev = inputs.device.type
        if self.same_as and inputs.requested == "auto":
            why.append(f"declared as the {self.same_as} composition here (auto names it {self.same_as})")
        if self.interpreter_on_cpu and dev == "cpu":
            if not triton_interpreting():
                why.append("CPU tensors need TRITON_INTERPRET=1 set before segformer_fast's kernel "
                           "modules are imported (or CUDA tensors)")
            elif inputs.requested == "auto":
                why.append("the Triton interpreter is a correctness tool: CPU tensors run it only "
                           "when 'triton' is asked for by name")
        elif self.devices is not None and dev not in self.devices:
            why.append(f"needs {' or '.join(self.devices)} tensors, got {dev}")
        if inputs.dtype not in self.dtypes:
            why.append(f"dtype {inputs.dtype} not in ({', '.join(str(d)[6:] for d in self.dtypes)})")
        if inputs.needs_grad and not self.backward:
            why.append("no backward: this call needs gradients")
        if not self.onnx and onnx_exporting():
            why.append("not exportable to ONNX (ONNX Runtime has no segformer_fast ops)")
        if self.limits is not None:
            why += self.limits(inputs)
        if not why and self.requires is not None:
            missing = self.requires()
            if missing:
                why.append(missing)
        return why


def needs_triton() -> str | None:
    return None if triton_available() else "triton is not installed"


def needs_native_cpu() -> str | None:
    if native_cpu_available():
        return None
    return f"the native CPU kernels did not build ({_native_cpu.get('error', 'unknown error')})"


def triton_impl(run: Callable, limits: Callable[[Inputs], list[str]] | None = None) -> Impl:
    """The Triton entry every op shares: CUDA tensors (CPU tensors through the interpreter when
    asked for by name), fp32/fp16/bf16, with a backward."""
    return Impl("triton", run, devices=("cuda",), dtypes=GPU_FLOATS, limits=limits,
                requires=needs_triton, interpreter_on_cpu=True)


_OPS: dict[str, tuple[Impl, ...]] = {}


def register(op: str, impls: Sequence[Impl]) -> tuple[Impl, ...]:
    """Declare an op's implementations (one entry per backend name; adding a backend to an op is
    one more entry). An op without a native ``cpu`` entry gets ``cpu`` as a declared alias of its
    ``torch`` composition on CPU tensors. Returns them in :data:`PRIORITY` order."""
    by_name = {i.name: i for i in impls}
    if len(by_name) != len(impls) or not set(by_name) <= set(PRIORITY):
        raise ValueError(f"{op}: implementation names must be distinct and among {PRIORITY}")
    if "cpu" not in by_name and "torch" in by_name:
        t = by_name["torch"]
        by_name["cpu"] = Impl("cpu", t.run, devices=("cpu",), dtypes=t.dtypes, backward=t.backward,
                              onnx=t.onnx, limits=t.limits, same_as="torch")
    _OPS[op] = tuple(by_name[n] for n in PRIORITY if n in by_name)
    return _OPS[op]


class BackendUnavailable(ValueError):
    """A named backend cannot run a call; the message lists every implementation's reasons."""


def _describe(op: str, inputs: Inputs) -> str:
    grad = ", with backward" if inputs.needs_grad else ""
    facts = "".join(f", {k}={v}" for k, v in inputs.facts.items())
    return f"{op} on {inputs.device.type} {str(inputs.dtype)[6:]}{grad}{facts}"


def select(op: str, inputs: Inputs) -> Impl:
    """The implementation that runs ``inputs`` (``inputs.requested``: a backend name or "auto").
    Raises :class:`BackendUnavailable` listing every implementation and its reasons."""
    impls = _OPS[op]
    if inputs.requested == "auto":
        for impl in impls:
            if not impl.not_supported_reasons(inputs):
                return impl
    else:
        for impl in impls:
            if impl.name == inputs.requested:
                if not impl.not_supported_reasons(inputs):
                    return impl
                break
    lines = [f"{op}: backend {inputs.requested!r} cannot run {_describe(op, inputs)}"]
    if inputs.requested not in {i.name for i in impls}:
        lines.append(f"  {inputs.requested}: no implementation of {op}")
    for impl in impls:
        why = impl.not_supported_reasons(inputs)
        lines.append(f"  {impl.name}: {'; '.join(why) if why else 'can run it'}")
    raise BackendUnavailable("\n".join(lines))


def requested(backend: str | None) -> str:
    """The backend name a call asks for: its ``backend=`` argument, else the process-wide one."""
    return _check_name(backend or get_backend())


@dataclass(frozen=True)
class Choice:
    """Answer of :func:`which`: the implementation that runs, and every implementation's reasons
    (an empty list for one that could run but comes later in priority or was not named)."""
    op: str
    requested: str
    name: str | None                 # None: nothing can run it (``error`` says why)
    reasons: dict[str, list[str]]
    error: str | None = None
    same_as: str | None = None       # "torch" when ``name`` is a declared alias (cpu, no native kernel)

    def __str__(self) -> str:
        if self.name is None:
            return self.error or f"{self.op}: no implementation"
        alias = f" (= the {self.same_as} composition)" if self.same_as else ""
        refused = "; ".join(f"{n}: {', '.join(r)}" for n, r in self.reasons.items() if r)
        return f"{self.op}: {self.name}{alias}" + (f"; refused: {refused}" if refused else "")


def which(op: str, device: torch.device | str, dtype: torch.dtype = torch.float32, *,
          backend: str | None = None, needs_grad: bool = False,
          facts: Mapping[str, object] | None = None) -> Choice:
    """Which implementation ``op`` (e.g. "sra_attention") would use on ``device`` for ``dtype``
    under ``backend`` (None: the process-wide choice), and why the others were refused. Shape
    limits are judged only for the ``facts`` given (e.g. ``{"head_dim": 160}``). Never raises for
    an impossible request: ``Choice.name`` is then None and ``Choice.error`` the message."""
    importlib.import_module("segformer_fast.ops")       # the ops register their implementations
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}: expected one of {', '.join(sorted(_OPS))}")
    inputs = Inputs(torch.device(device), dtype, needs_grad, requested(backend), dict(facts or {}))
    reasons = {i.name: i.not_supported_reasons(inputs) for i in _OPS[op]}
    try:
        impl = select(op, inputs)
    except BackendUnavailable as e:
        return Choice(op, inputs.requested, None, reasons, str(e))
    return Choice(op, inputs.requested, impl.name, reasons, None, impl.same_as)


def ops() -> tuple[str, ...]:
    """Names of every op with declared implementations."""
    importlib.import_module("segformer_fast.ops")
    return tuple(_OPS)
