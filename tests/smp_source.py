"""segmentation_models_pytorch's own SegFormer source, runnable without its dependencies.

smp cannot be imported beside a CPU torch: its encoders import timm, and timm imports a
torchvision built for the installed torch (PyPI's does not load beside torch 2.13 CPU). The files
that make up smp's SegFormer only need three names from ``timm.layers``, so this loads those files
as they are (from an smp wheel unpacked with ``pip install --no-deps --target DIR``, found through
``SEGFORMER_FAST_SMP``; .ci/run installs it) under their real module names, with a stand-in for
``timm.layers`` (DropPath, to_2tuple, trunc_normal_ — the timm semantics smp relies on).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch.nn as nn

FILES = {  # module name -> path inside the package
    "segmentation_models_pytorch.encoders._utils": "encoders/_utils.py",
    "segmentation_models_pytorch.encoders._base": "encoders/_base.py",
    "segmentation_models_pytorch.encoders.mix_transformer": "encoders/mix_transformer.py",
    "segmentation_models_pytorch.base.modules": "base/modules.py",
    "segmentation_models_pytorch.base.heads": "base/heads.py",
    "segmentation_models_pytorch.decoders.segformer.decoder": "decoders/segformer/decoder.py",
}


def _timm_layers() -> types.ModuleType:
    from segformer_fast.models.segformer import DropPath

    mod = types.ModuleType("timm.layers")
    mod.DropPath = DropPath
    mod.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    mod.trunc_normal_ = nn.init.trunc_normal_
    return mod


def load() -> dict[str, types.ModuleType]:
    """smp's modules by name; skips (fails in CI) when the source is not installed."""
    root = os.environ.get("SEGFORMER_FAST_SMP")
    pkg = Path(root) / "segmentation_models_pytorch" if root else None
    if pkg is None or not pkg.is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI must set SEGFORMER_FAST_SMP to an unpacked segmentation-models-pytorch (see .ci/run)")
        pytest.skip("set SEGFORMER_FAST_SMP to a directory holding segmentation_models_pytorch (CI does)")
    saved = {k: v for k, v in sys.modules.items() if k.startswith(("segmentation_models_pytorch", "timm"))}
    try:
        for name in ("segmentation_models_pytorch", "segmentation_models_pytorch.encoders",
                     "segmentation_models_pytorch.base", "segmentation_models_pytorch.decoders",
                     "segmentation_models_pytorch.decoders.segformer", "timm"):
            parent = types.ModuleType(name)
            parent.__path__ = []            # a package, so relative imports resolve through sys.modules
            sys.modules[name] = parent
        sys.modules["timm.layers"] = _timm_layers()
        loaded = {}
        for name, rel in FILES.items():
            spec = importlib.util.spec_from_file_location(name, pkg / rel)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded[name.rsplit(".", 1)[1]] = module
        return loaded
    finally:
        for k in [k for k in sys.modules if k.startswith(("segmentation_models_pytorch", "timm"))]:
            del sys.modules[k]
        sys.modules.update(saved)
