"""Semantic segmentation post-processing without full-resolution logits.

``postprocess(outputs, target_sizes=None)`` is a drop-in for Hugging Face's
``image_processor.post_process_semantic_segmentation(outputs, target_sizes)`` (SegFormer, and every
processor with the same contract): the same inputs (model outputs with ``.logits`` or a
``"logits"`` key, or the logits tensor itself; ``target_sizes`` a list of (H, W), a (B, 2) tensor
or array, or None) and the same outputs: a list of B (H, W) int64 label maps. With ``target_sizes``
each image's labels come from :func:`segformer_fast.ops.resize_argmax` (bilinear, align_corners
False, argmax fused: no (K, H, W) logits; images sharing a size go in one batched call); without,
``logits.argmax(1)`` at logit resolution, exactly as HF does.

Labels equal the stock processor's for fp32 logits except where the top two classes are within fp32
rounding of each other (see ``ops/resize_argmax.py``); for fp16/bf16 logits the stock processor
interpolates in that dtype while the fused op interpolates in fp32 (more exact, and so it may
differ at more near-ties).

``patch_processor(obj)`` routes an HF image processor, or an ``image-segmentation`` pipeline (its
``image_processor``), through it: it binds a ``post_process_semantic_segmentation`` on that one
instance (the class and other instances are untouched; ``unpatch_processor`` removes it). The
pipeline calls ``post_process_semantic_segmentation(model_outputs, target_sizes=...)`` for semantic
models such as SegFormer, so ``pipeline(...)`` then returns the fused labels. A call asking for
``return_segmentation_scores=True`` (the full-resolution per-class scores) goes to the stock method.
"""
from __future__ import annotations

import types

from torch import Tensor

from .ops import resize_argmax

__all__ = ["postprocess", "patch_processor", "unpatch_processor"]

_ORIGINAL = "_segformer_fast_post_process_semantic_segmentation"


def _logits_of(outputs) -> Tensor:
    if isinstance(outputs, Tensor):
        logits = outputs
    elif hasattr(outputs, "logits"):
        logits = outputs.logits
    elif isinstance(outputs, dict) and "logits" in outputs:
        logits = outputs["logits"]
    else:
        raise TypeError(f"postprocess: outputs must have .logits (model outputs), a 'logits' key or be "
                        f"the logits tensor, got {type(outputs).__name__}")
    if not isinstance(logits, Tensor) or logits.dim() != 4:
        raise ValueError(f"postprocess: logits must be a (B, classes, h, w) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    return logits


def _sizes(target_sizes, batch: int) -> list[tuple[int, int]]:
    if isinstance(target_sizes, Tensor):
        target_sizes = target_sizes.tolist()
    elif hasattr(target_sizes, "tolist") and not isinstance(target_sizes, (list, tuple)):
        target_sizes = target_sizes.tolist()            # numpy arrays
    if len(target_sizes) != batch:
        raise ValueError("Make sure that you pass in as many target sizes as the batch dimension of the "
                         f"logits (logits batch {batch}, {len(target_sizes)} target sizes)")
    sizes = []
    for i, s in enumerate(target_sizes):
        s = s.tolist() if hasattr(s, "tolist") else s
        if not isinstance(s, (list, tuple)) or len(s) != 2:
            raise ValueError(f"postprocess: target_sizes[{i}] must be (height, width), got {s!r}")
        sizes.append((int(s[0]), int(s[1])))
    return sizes


def postprocess(outputs, target_sizes=None, *, backend: str | None = None) -> list[Tensor]:
    """Drop-in for ``post_process_semantic_segmentation(outputs, target_sizes)``: a list of B
    (H, W) int64 label maps (see the module docstring). ``backend`` pins resize_argmax's backend."""
    logits = _logits_of(outputs)
    B = logits.shape[0]
    if target_sizes is None:
        seg = logits.argmax(dim=1)
        return [seg[i] for i in range(B)]
    sizes = _sizes(target_sizes, B)
    out: list[Tensor | None] = [None] * B
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        by_size.setdefault(s, []).append(i)
    for size, idx in by_size.items():
        part = logits if len(idx) == B else logits[idx]
        labels = resize_argmax(part, size, backend=backend)
        for j, i in enumerate(idx):
            out[i] = labels[j]
    return out


def _processor_of(obj):
    proc = getattr(obj, "image_processor", None)        # a pipeline
    target = proc if proc is not None else obj
    if not hasattr(target, "post_process_semantic_segmentation"):
        raise TypeError(f"patch_processor: {type(obj).__name__} has no post_process_semantic_segmentation "
                        "(expected an HF image processor or an image-segmentation pipeline)")
    return target


def patch_processor(obj, *, backend: str | None = None):
    """Route ``obj``'s ``post_process_semantic_segmentation`` (an HF image processor, or a pipeline's
    ``image_processor``) through :func:`postprocess`, on that instance only. Idempotent. Returns the
    patched processor."""
    proc = _processor_of(obj)
    if _ORIGINAL in proc.__dict__:
        return proc
    original = proc.post_process_semantic_segmentation

    def post_process_semantic_segmentation(self, outputs, target_sizes=None, return_segmentation_scores=False):
        if return_segmentation_scores:       # full-resolution per-class scores: nothing to fuse
            return original(outputs, target_sizes=target_sizes, return_segmentation_scores=True)
        return postprocess(outputs, target_sizes, backend=backend)

    post_process_semantic_segmentation.__doc__ = postprocess.__doc__
    proc.__dict__[_ORIGINAL] = original
    proc.post_process_semantic_segmentation = types.MethodType(post_process_semantic_segmentation, proc)
    return proc


def unpatch_processor(obj):
    """Undo :func:`patch_processor` (a no-op on an unpatched processor). Returns the processor."""
    proc = _processor_of(obj)
    if _ORIGINAL in proc.__dict__:
        del proc.__dict__[_ORIGINAL]
        del proc.__dict__["post_process_semantic_segmentation"]
    return proc

