"""Benchmarks share the test session setup (Triton interpreter choice before kernel imports) and
save every timed run as JSON under benchmarks/results/ (machine info, versions, shapes)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    opt = config.option
    if getattr(opt, "benchmark_disable", True) or getattr(opt, "benchmark_json", None):
        return
    if not (getattr(opt, "benchmark_save", None) or getattr(opt, "benchmark_autosave", False)):
        opt.benchmark_autosave = True
    opt.benchmark_storage = "file://" + RESULTS


@pytest.fixture
def smoke(benchmark):
    """True when benchmark bodies run once as smoke tests (--benchmark-disable, as on CI): cases
    then shrink their inputs, since only the code path is being checked."""
    return benchmark.disabled

