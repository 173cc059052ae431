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
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def cache_root() -> Path:
    root = os.environ.get("SEGFORMER_FAST_BUILD_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segformer_fast"


def _digest(paths: list[Path], flags: tuple[str, ...]) -> str:
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    for flag in flags:
        h.update(flag.encode())
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    # Headers change the build too.
    for p in sorted(CSRC.rglob("*.h")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def load(name: str, sources: tuple[str, ...], extra_cflags: tuple[str, ...] = ("-O3",),
         extra_ldflags: tuple[str, ...] = ()):
    """Build (once) and import the extension ``name`` from ``sources`` (paths relative to csrc/)."""
    if not CSRC.is_dir():
        raise RuntimeError(f"segformer_fast: native sources not found at {CSRC}; install from a "
                           "source checkout (pip install -e .) to use the native backends")
    from torch.utils import cpp_extension

    paths = [CSRC / s for s in sources]
    build_dir = cache_root() / f"{name}-{_digest(paths, extra_cflags + extra_ldflags)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(p) for p in paths],
        extra_cflags=list(extra_cflags),
        extra_ldflags=list(extra_ldflags),
        extra_include_paths=[str(CSRC)],
        build_directory=str(build_dir),
        verbose=os.environ.get("SEGFORMER_FAST_VERBOSE_BUILD") == "1",
    )
