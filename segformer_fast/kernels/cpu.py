"""The native CPU kernels of ``csrc/cpu`` (C++, ``at::parallel_for``), built on first use."""
from __future__ import annotations

SOURCES = ("cpu/upsample_sum.cpp", "cpu/resize_argmax.cpp", "cpu/sra_attention.cpp", "bindings/cpu.cpp")
# -fopenmp: at::parallel_for is inline OpenMP in the headers; without the flag it runs serially.
# -ffp-contract=off: the AVX-512 and portable instantiations of a kernel (cpu/isa.h) must round
# alike, so neither may fuse a multiply-add into an FMA.
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")


def native():
    """The compiled extension module (built once per machine and cached; see ``_build.py``)."""
    from .._build import load

    return load("segformer_fast_cpu", SOURCES, CFLAGS, ("-fopenmp",))
