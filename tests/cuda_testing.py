"""Helpers shared by the CUDA C++ kernel tests (tests/test_*_cuda.py): the emulated build as a
fixture with block orders, and the ahead-of-time nvcc check (ptxas registers and spills per kernel).

Each ``.cu`` is compiled at most once per (file, arch) in a test session, whichever test asks first.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from segformer_fast.kernels import cuda as K

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
CU_FILES = sorted(p.relative_to(CSRC).as_posix() for p in (CSRC / "cuda").rglob("*.cu"))
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")

# block orders every emulated kernel test runs in: (order, seed, worker threads)
ORDERS = {
    "sequential": ("sequential", 0, 1),
    "shuffled-2workers": ("shuffled", 11, 2),   # blocks and warps shuffled, two blocks at a time
}


@pytest.fixture(scope="module")
def emu():
    """The emulated build with SEGFORMER_FAST_CUDA_EMULATE=1 for the module's tests (one g++ build
    per machine, cached by _build.py); the environment and the block order are restored after."""
    old = os.environ.get(K.EMULATE_ENV)
    os.environ[K.EMULATE_ENV] = "1"
    m = K.emulated_build()
    yield m
    m.emu_configure("sequential", 0, 1, 80)
    if old is None:
        del os.environ[K.EMULATE_ENV]
    else:
        os.environ[K.EMULATE_ENV] = old


@pytest.fixture(params=list(ORDERS))
def order(request, emu):
    """Runs the test once per block order of ORDERS."""
    emu.emu_configure(*ORDERS[request.param], 80)
    yield request.param
    emu.emu_configure("sequential", 0, 1, 80)


def ptxas_report(text: str) -> dict[str, tuple[int, int, int]]:
    """kernel -> (registers, spill store bytes, spill load bytes) from ``ptxas -v`` output."""
    out, cur, spills = {}, None, (None, None)
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            cur = m.group(1)
        elif (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)) and cur:
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and cur:
            out[cur] = (int(m.group(1)), *spills)
            cur, spills = None, (None, None)
    return out


@functools.lru_cache(maxsize=None)
def _nvcc(cu: str, arch: str) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [NVCC, "-std=c++17", "-O3", "-Xptxas", "-v", "-I", str(CSRC), "-I", str(CSRC / "cuda"),
               "-cubin", f"-gencode={ARCHS[arch]}", str(CSRC / cu), "-o", str(Path(tmp) / "k.cubin")]
        r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode, r.stderr


def assert_no_spills(cu: str, arch: str) -> dict[str, tuple[int, int, int]]:
    """Compiles ``cu`` (relative to csrc/) for ``arch`` as the GPU build does; asserts that it
    compiles and that ptxas reports 0 spill bytes for every kernel; prints registers per kernel."""
    rc, err = _nvcc(cu, arch)
    assert rc == 0, err[-4000:]
    kernels = ptxas_report(err)
    assert kernels and len(kernels) == err.count("Compiling entry function"), err[-2000:]
    demangle = shutil.which("c++filt")
    for name, (regs, stores, loads) in kernels.items():
        pretty = subprocess.run([demangle, name], capture_output=True, text=True).stdout.strip() if demangle else name
        print(f"{arch} {cu}: {regs:>3} registers, {stores}/{loads} spill bytes  {pretty}")
        assert (stores, loads) == (0, 0), f"{pretty} spills on {arch}: {stores} B stores, {loads} B loads"
    return kernels
