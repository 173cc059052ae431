"""The native CPU kernels of ``csrc/cpu`` (C++, ``at::parallel_for``), built on first use."""
from __future__ import annotations

SOURCES = ("cpu/upsample_sum.cpp", "bindings/cpu.cpp")
# -fopenmp: at::parallel_for is inline OpenMP in the headers; without the flag it runs serially.
CFLAGS = ("-O3", "-fopenmp")


def native():
    """The compiled extension module (built once per machine and cached; see ``_build.py``)."""
    from .._build import load

    return load("segformer_fast_cpu", SOURCES, CFLAGS, ("-fopenmp",))
