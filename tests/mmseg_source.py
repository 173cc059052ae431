"""mmsegmentation's own SegFormer source (1.x), runnable beside a CPU torch.

mmseg's and mmcv's package ``__init__`` files import far more than SegFormer needs:
``mmseg/models/__init__`` imports every model, ``mmcv/__init__`` and ``mmcv/cnn/__init__`` import
OpenCV (``mmcv.image``, and ``mmengine.runner`` through ``mmcv.cnn.alexnet``), and mmcv's compiled
ops cannot be installed beside torch 2.13 CPU. So this loads the files that make up mmseg's
SegFormer as they are, under their real module names, from a directory filled by

    pip install --no-deps --target DIR mmsegmentation==1.2.2 mmcv-lite==2.1.0 mmengine==0.10.7 \
        addict==2.4.0 termcolor==3.3.0 yapf==0.43.0 platformdirs==4.14.8

(found through ``SEGFORMER_FAST_MMSEG``; ``.ci/run`` installs it; mmseg 1.2.2 asserts
mmcv < 2.2.0, hence mmcv-lite 2.1.0). Real and unmodified: ``mmengine`` (registries,
``BaseModule``, weight init), ``mmcv.cnn.bricks`` (ConvModule, Conv2d wrapper, build_norm_layer,
build_dropout, DropPath, MultiheadAttention), mmseg's own ``__init__`` (its version checks),
``models/backbones/mit.py``, ``models/decode_heads/{decode_head,segformer_head}.py``,
``models/utils/{embed,shape_convert,wrappers}.py``, ``models/losses/{accuracy,cross_entropy_loss,
utils}.py``, ``models/builder.py``, ``registry``, ``structures``, ``utils/typing_utils.py``. The
only stand-ins are the ``__init__`` files of ``mmcv``, ``mmcv.cnn``, ``mmseg.utils``,
``mmseg.models`` and its subpackages: empty packages whose ``__path__`` is the real folder,
given the names the loaded files import from them (each taken from the real submodule that
defines it). No mmseg/mmcv arithmetic is replaced. ``mmcv.ops`` is absent (no compiled ops);
``mmcv.cnn.bricks.transformer`` already treats it as optional and SegFormer never uses it.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
import warnings
from pathlib import Path

import pytest

ROOTS = ("mmseg", "mmcv", "mmengine", "addict", "yapf", "yapf_third_party", "termcolor",
         "platformdirs")

# package -> {name: real submodule that defines it}: what the loaded files import from packages
# whose own __init__ is not run
REEXPORTS = {
    "mmcv.cnn": {n: "mmcv.cnn.bricks" for n in (
        "Conv2d", "ConvModule", "Linear", "build_activation_layer", "build_conv_layer",
        "build_norm_layer", "build_padding_layer", "build_upsample_layer", "build_plugin_layer",
        "is_norm")},
    "mmseg.utils": {n: "mmseg.utils.typing_utils" for n in (
        "ConfigType", "OptConfigType", "MultiConfig", "OptMultiConfig", "SampleList",
        "OptSampleList", "ForwardResults")},
    "mmseg.models.utils": {"PatchEmbed": "mmseg.models.utils.embed",
                           "nchw_to_nlc": "mmseg.models.utils.shape_convert",
                           "nlc_to_nchw": "mmseg.models.utils.shape_convert",
                           "resize": "mmseg.models.utils.wrappers"},
    "mmseg.models.losses": {"accuracy": "mmseg.models.losses.accuracy",
                            "CrossEntropyLoss": "mmseg.models.losses.cross_entropy_loss"},
}
SKELETONS = ("mmcv", "mmcv.cnn", "mmseg.utils", "mmseg.models", "mmseg.models.utils",
             "mmseg.models.losses", "mmseg.models.backbones", "mmseg.models.decode_heads")


def _root() -> Path:
    root = os.environ.get("SEGFORMER_FAST_MMSEG")
    if not root or not (Path(root) / "mmseg" / "models" / "backbones" / "mit.py").is_file():
        if os.environ.get("CI"):
            pytest.fail("CI must set SEGFORMER_FAST_MMSEG to a directory holding mmsegmentation, "
                        "mmcv-lite and mmengine installed with pip --target (see .ci/run)")
        pytest.skip("set SEGFORMER_FAST_MMSEG to a directory holding mmseg, mmcv (mmcv-lite) and "
                    "mmengine, installed with pip install --no-deps --target (CI does)")
    return Path(root)


def _ours(name: str) -> bool:
    return name.split(".", 1)[0] in ROOTS


@contextlib.contextmanager
def loaded():
    """Yields ``types.SimpleNamespace(mit=..., segformer_head=..., decode_head=..., embed=...)``:
    mmseg's modules; sys.modules and sys.path are restored on exit (skips, or fails in CI, when
    the source is not installed)."""
    root = _root()
    saved_modules = {k: v for k, v in sys.modules.items() if _ours(k)}
    saved_path = list(sys.path)
    try:
        for k in [k for k in sys.modules if _ours(k)]:
            del sys.modules[k]
        sys.path.append(str(root))              # after the venv: nothing there shadows torch
        for name in SKELETONS:
            if name == "mmseg.utils":
                # mmseg's own __init__ (its mmcv/mmengine version checks, digit_version that
                # mit.py imports): cheap, so it runs as it is
                sys.modules["mmcv"].__version__ = _dist_version(root, "mmcv_lite")
                importlib.import_module("mmseg")
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(root.joinpath(*name.split(".")))]
            sys.modules[name] = pkg
            if "." in name:
                parent, _, child = name.rpartition(".")
                setattr(sys.modules[parent], child, pkg)
        with warnings.catch_warnings():
            # mmcv-lite has no compiled ops; transformer.py warns that one optional op is absent
            warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")
            for pkg, names in REEXPORTS.items():
                for name, src in names.items():
                    setattr(sys.modules[pkg], name, getattr(importlib.import_module(src), name))
            ns = types.SimpleNamespace(
                mit=importlib.import_module("mmseg.models.backbones.mit"),
                segformer_head=importlib.import_module("mmseg.models.decode_heads.segformer_head"),
                decode_head=importlib.import_module("mmseg.models.decode_heads.decode_head"),
                embed=importlib.import_module("mmseg.models.utils.embed"),
                drop=importlib.import_module("mmcv.cnn.bricks.drop"),
                root=root)
        for m in (ns.mit, ns.segformer_head, ns.embed):
            assert Path(m.__file__).is_relative_to(root), m.__file__   # the real files, not ours
        yield ns
    finally:
        for k in [k for k in sys.modules if _ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path


def _dist_version(root: Path, dist: str) -> str:
    found = sorted(root.glob(f"{dist}-*.dist-info"))
    return found[0].name[len(dist) + 1:-len(".dist-info")] if found else "0"
