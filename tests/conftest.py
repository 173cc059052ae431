"""Test session setup.

The Triton interpreter must be chosen before any kernel module is imported (``@triton.jit``
decides at decoration time), so this runs first: without a CUDA device every Triton kernel
executes on the CPU through the interpreter.

Devices: a test that takes the ``device`` fixture runs once per device here: on CPU tensors (the
Triton interpreter for ``backend="triton"``, tiny shapes) and, on a machine with a GPU, on CUDA
tensors too (the real kernels and tile configurations, fp16/bf16 on tensor cores). A case marked
``gpu`` (SegFormer-scale shapes) runs only with device cuda.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns when unset; keep its GPU default (FMA contraction on) explicitly.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer than a few seconds on a 2-core CPU")


DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    too_big = pytest.mark.skip(reason="SegFormer-scale case: CUDA tensors only (the interpreter is "
                                      "~0.6 ms per program)")
    for item in items:
        if "gpu" not in item.keywords:
            continue
        if not torch.cuda.is_available():
            item.add_marker(no_gpu)
        elif getattr(item, "callspec", None) is not None and item.callspec.params.get("device") == "cpu":
            item.add_marker(too_big)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device the tensors of a contract test live on (see the module docstring)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
