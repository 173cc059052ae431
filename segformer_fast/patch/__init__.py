"""``segformer_fast.patch(model)``: fused forwards for the SegFormer code people already run.

Each codebase adapter (hf.py, mmseg.py, nvlabs.py, smp.py) owns that codebase's attribute names
and return conventions and says which of a model's modules are patch embeddings, attentions,
Mix-FFNs and decode heads. ``patch`` binds a fused forward onto each of those *instances*: the
module object, its class, its hooks, its Parameters and ``state_dict`` stay exactly as they were
(``isinstance``, FSDP wrap policies, PEFT targeting and forward hooks keep working); only its
``forward`` changes, and ``unpatch`` restores it. A part that is not exactly its weights (a PEFT
LoRA layer, a quantised linear, a module with hooks) is called as a module by the fused forward;
what cannot be fused exactly is refused with a reason in ``report.skipped``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ..backends import _check_name
from . import hf, mmseg, nvlabs, smp
from ._match import bind, is_patched, unbind, walk

# smp before nvlabs: smp's encoder has NVlabs' attribute names but other conventions.
# mmseg before nvlabs: mmseg is recognised by its whole backbone structure, nvlabs by looser
# per-module attribute tests.
ADAPTERS = (hf, mmseg, smp, nvlabs)


@dataclass
class PatchReport:
    """What ``patch`` did: the dotted paths it patched and the ones it left alone, with reasons
    (the model itself, when given a bare part, is reported as its class name)."""

    ecosystem: str
    replaced: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"segformer_fast.patch ({self.ecosystem}): {len(self.replaced)} modules patched, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"  skipped {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def patch(model: nn.Module, backend: str = "auto") -> PatchReport:
    """Bind fused forwards onto SegFormer's hot modules in ``model`` (in place).

    ``model``: a whole SegFormer or one part of it (a decode head, an attention, a Mix-FFN, a patch
    embedding) from Hugging Face transformers (<= 5.8 and >= 5.9 layouts), mmseg 1.x, NVlabs /
    seed-style code (and ``segformer_fast.models``) or segmentation_models_pytorch. ``backend``
    pins the backend of every patched module ("auto" follows ``set_backend`` at call time).
    Returns a ``PatchReport``; a second call patches nothing more. Raises TypeError when nothing
    in ``model`` is a SegFormer part this version recognises.
    """
    _check_name(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects an nn.Module, got {type(model).__name__}")
    for adapter in ADAPTERS:
        if adapter.matches(model):
            break
    else:
        raise TypeError(f"patch: {type(model).__name__} is not a SegFormer (or a part of one) this "
                        "version recognises (Hugging Face, mmseg 1.x, NVlabs/seed-style or "
                        "segmentation_models_pytorch)")
    report = PatchReport(adapter.NAME)
    pinned = None if backend == "auto" else backend
    found = 0
    for path, module, rule in walk(model, adapter.RULES):
        found += 1
        if is_patched(module):
            continue
        why = rule.unfusable(module)
        if why is not None:
            report.skipped.append((path or type(module).__name__, why))
            continue
        bind(module, rule, adapter.NAME, pinned)
        report.replaced.append(path or type(module).__name__)
    if found == 0:
        raise TypeError(f"patch: {type(model).__name__} looks like {adapter.NAME} code but holds no "
                        "patch embedding, attention, Mix-FFN or decode head this version recognises")
    return report


def unpatch(model: nn.Module) -> int:
    """Restore the class forward of every module ``patch`` bound; returns how many."""
    return sum(unbind(m) for m in model.modules())


__all__ = ["patch", "unpatch", "PatchReport"]
