"""``segformer_fast.patch(model)``: swap fused modules into the SegFormer code people already run.

Each ecosystem adapter (hf.py, mmseg.py, nvlabs.py, smp.py) only says *which* modules of a model
are patch embeddings, attentions, Mix-FFNs and decode heads; the drop-in modules in
``segformer_fast.nn`` know how to read each layout. Patching works in place, shares every
Parameter (``state_dict()`` keys and values are unchanged), keeps train/eval mode, and is
idempotent. ``unpatch`` puts the original modules back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ..backends import _check_name
from . import hf, mmseg, nvlabs, smp

# smp before nvlabs: smp's encoder has NVlabs' attribute names but other conventions.
# mmseg before nvlabs: mmseg is recognised by its whole backbone structure, nvlabs by looser
# per-module attribute tests.
ADAPTERS = (hf, mmseg, smp, nvlabs)


@dataclass
class PatchReport:
    """What ``patch`` did: the dotted paths it replaced and the ones it left alone, with reasons."""

    ecosystem: str
    replaced: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"segformer_fast.patch ({self.ecosystem}): {len(self.replaced)} modules replaced, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"  skipped {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def _is_fused(m: nn.Module) -> bool:
    return "_sf_original" in m.__dict__


def patch(model: nn.Module, backend: str = "auto") -> PatchReport:
    """Replace SegFormer's hot modules in ``model`` (in place) with fused drop-ins.

    Recognises Hugging Face transformers (<= 5.8 and >= 5.9 layouts), mmseg 1.x's
    ``MixVisionTransformer`` backbone, NVlabs / seed-style code (and ``segformer_fast.models``) and
    segmentation_models_pytorch's MiT encoder. ``backend`` pins
    the backend of every inserted module ("auto" follows ``set_backend`` at call time).
    Returns a ``PatchReport``; a second call replaces nothing.
    """
    _check_name(backend)
    if model is None or not isinstance(model, nn.Module):
        raise TypeError(f"patch expects an nn.Module, got {type(model).__name__}")
    for adapter in ADAPTERS:
        if adapter.matches(model):
            break
    else:
        raise TypeError(f"patch: {type(model).__name__} is not a SegFormer this version recognises "
                        "(Hugging Face, mmseg 1.x, NVlabs/seed-style or segmentation_models_pytorch)")
    report = PatchReport(adapter.NAME)
    if hasattr(adapter, "skipped"):
        report.skipped.extend(adapter.skipped(model))
    pinned = None if backend == "auto" else backend
    for path, module, fused_cls in adapter.targets(model):
        if _is_fused(module):
            continue
        try:
            fused = fused_cls.from_module(module, backend=pinned)
        except (TypeError, ValueError, NotImplementedError) as e:
            report.skipped.append((path, str(e)))
            continue
        # Kept outside the module registry: registering it would add duplicate state_dict keys.
        object.__setattr__(fused, "_sf_original", module)
        fused.train(module.training)
        _set(model, path, fused)
        report.replaced.append(path)
    return report


def unpatch(model: nn.Module) -> int:
    """Put back every original module that ``patch`` replaced; returns how many."""
    paths = [p for p, m in model.named_modules() if _is_fused(m)]
    for path in paths:
        fused = model.get_submodule(path)
        original = fused._sf_original
        original.train(fused.training)
        _set(model, path, original)
    return len(paths)


__all__ = ["patch", "unpatch", "PatchReport"]
