"""Lazy ninja JIT build of the native kernels in ``csrc/``, cached on disk and per process.

Nothing is compiled at install time (setup.py must not import torch). The first call of
``load(name, sources)`` compiles with ``torch.utils.cpp_extension.load`` into a directory keyed by
a hash of the sources, flags and torch version, so later processes (a second test session, CI's
benchmark step) reuse the build instead of paying ~25 s each.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def cache_root() -> Path:
    root = os.environ.get("SEGFORMER_FAST_BUILD_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segformer_fast"


_INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.M)


def _included(paths: list[Path]) -> list[Path]:
    """``paths`` and every file under csrc they ``#include "..."``, transitively (.cu, .cuh, .h,
    .cpp alike: the emulated CUDA build includes .cu files), resolved like the compiler does: next to
    the including file first, then from csrc/ (the include path every build gets)."""
    seen: dict[Path, None] = {}
    todo = [p.resolve() for p in paths]
    while todo:
        p = todo.pop()
        if p in seen or not p.is_file():
            continue
        seen[p] = None
        for name in _INCLUDE.findall(p.read_bytes()):
            rel = name.decode()
            for base in (p.parent, CSRC):
                cand = (base / rel).resolve()
                if cand.is_file():
                    todo.append(cand)
                    break
    return sorted(seen)


def _digest(paths: list[Path], flags: tuple[str, ...]) -> str:
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    for flag in flags:
        h.update(flag.encode())
    # every source and every csrc file it includes: an edit to an included .cu/.cuh/.h rebuilds
    for p in _included(paths):
        h.update(str(p.relative_to(CSRC) if p.is_relative_to(CSRC) else p).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build_dir(name: str, sources: tuple[str, ...], extra_cflags: tuple[str, ...] = ("-O3",),
              extra_ldflags: tuple[str, ...] = (), extra_cuda_cflags: tuple[str, ...] = ()) -> Path:
    """The cache directory ``load`` builds ``name`` into for these sources and flags (whether or not
    it exists yet: ``(build_dir(...) / f"{name}.so").exists()`` says whether the build is cached)."""
    paths = [CSRC / s for s in sources]
    return cache_root() / f"{name}-{_digest(paths, extra_cflags + extra_ldflags + extra_cuda_cflags)}"


@functools.lru_cache(maxsize=None)
def load(name: str, sources: tuple[str, ...], extra_cflags: tuple[str, ...] = ("-O3",),
         extra_ldflags: tuple[str, ...] = (), extra_cuda_cflags: tuple[str, ...] = ()):
    """Build (once) and import the extension ``name`` from ``sources`` (paths relative to csrc/).

    ``extra_cuda_cflags`` go to nvcc for ``.cu`` sources (CUDA torch only)."""
    if not CSRC.is_dir():
        raise RuntimeError(f"segformer_fast: native sources not found at {CSRC}; install from a "
                           "source checkout (pip install -e .) to use the native backends")
    from torch.utils import cpp_extension

    paths = [CSRC / s for s in sources]
    where = build_dir(name, sources, extra_cflags, extra_ldflags, extra_cuda_cflags)
    where.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(p) for p in paths],
        extra_cflags=list(extra_cflags),
        extra_ldflags=list(extra_ldflags),
        extra_cuda_cflags=list(extra_cuda_cflags) or None,
        extra_include_paths=[str(CSRC)],
        build_directory=str(where),
        verbose=os.environ.get("SEGFORMER_FAST_VERBOSE_BUILD") == "1",
    )
