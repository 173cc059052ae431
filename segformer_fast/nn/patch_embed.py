"""Drop-in conv + LayerNorm modules: overlapping patch embedding and sequence reduction.

Both keep the replaced module's children under their original attribute names (so the
Parameters are the same objects and ``state_dict()`` keys are unchanged) and run
``segformer_fast.ops.conv_layernorm`` on them. A new source layout is one entry in ``LAYOUTS``.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..ops.conv_layernorm import conv_layernorm

__all__ = ["FusedOverlapPatchEmbed", "FusedOverlapPatchEmbedNCHW", "FusedSequenceReduction", "LAYOUTS"]

# layout name -> (conv attribute, norm attribute, what forward returns)
#   "tokens_h_w": (tokens, H, W)        NVlabs / seed / our model, HF <= 5.8 and >= 5.9 patch embeddings
#   "tokens_hw":  (tokens, (H, W))      mmseg 1.x PatchEmbed
#   "tokens":     tokens                HF >= 5.9 SegformerSequenceReduction (input: tokens, H, W)
#   "nchw":       (B, C, H', W') map    segmentation_models_pytorch's OverlapPatchEmbed
LAYOUTS = {
    "nvlabs": ("proj", "norm", "tokens_h_w"),
    "hf": ("proj", "layer_norm", "tokens_h_w"),
    "mmseg": ("projection", "norm", "tokens_hw"),
    "hf_sequence_reduction": ("sequence_reduction", "layer_norm", "tokens"),
    "smp": ("proj", "norm", "nchw"),
}


def _detect(m: nn.Module, candidates) -> str:
    for name in candidates:
        conv, norm, _ = LAYOUTS[name]
        if isinstance(getattr(m, conv, None), nn.Conv2d) and isinstance(getattr(m, norm, None), nn.LayerNorm):
            return name
    raise ValueError(f"{type(m).__name__}: no known conv/LayerNorm attribute pair "
                     f"(tried {[LAYOUTS[c][:2] for c in candidates]})")


def _check_supported(m: nn.Module, conv: nn.Conv2d, norm: nn.LayerNorm) -> None:
    why = []
    if conv.groups != 1:
        why.append(f"groups={conv.groups}")
    if tuple(conv.dilation) != (1, 1):
        why.append(f"dilation={conv.dilation}")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        why.append(f"padding={conv.padding!r} mode={conv.padding_mode}")
    if tuple(norm.normalized_shape) != (conv.out_channels,):
        why.append(f"LayerNorm over {tuple(norm.normalized_shape)} != ({conv.out_channels},)")
    if getattr(m, "adap_padding", None) is not None:         # mmseg PatchEmbed(padding="corner")
        why.append("adaptive padding")
    if why:
        raise ValueError(f"{type(m).__name__} cannot be fused: {', '.join(why)}")


class _ConvLayerNorm(nn.Module):
    _candidates: tuple[str, ...] = ()

    def __init__(self, conv: nn.Conv2d, norm: nn.LayerNorm, layout: str = "nvlabs",
                 backend: str | None = None):
        super().__init__()
        conv_name, norm_name, self._returns = LAYOUTS[layout]
        self.layout = layout
        self._conv_name, self._norm_name = conv_name, norm_name
        self.add_module(conv_name, conv)      # same objects, same state_dict keys
        self.add_module(norm_name, norm)
        self.backend = backend                 # None -> process-wide choice

    @classmethod
    def from_module(cls, m: nn.Module, backend: str | None = None):
        """Wrap ``m``'s own conv and LayerNorm (Parameters shared, not copied)."""
        layout = _detect(m, cls._candidates)
        conv_name, norm_name, _ = LAYOUTS[layout]
        conv, norm = getattr(m, conv_name), getattr(m, norm_name)
        _check_supported(m, conv, norm)
        return cls(conv, norm, layout, backend)

    def _run(self, x: Tensor, hw=None):
        conv: nn.Conv2d = getattr(self, self._conv_name)
        norm: nn.LayerNorm = getattr(self, self._norm_name)
        return conv_layernorm(x, conv.weight, conv.bias, norm.weight, norm.bias, tuple(conv.stride),
                              tuple(conv.padding), norm.eps, hw, backend=self.backend)

    def extra_repr(self) -> str:
        return f"layout={self.layout}, backend={self.backend}"


class FusedOverlapPatchEmbed(_ConvLayerNorm):
    """Overlapping patch embedding: image (B, Cin, H, W) -> tokens, fused conv + LayerNorm.

    Returns ``(tokens, H', W')`` (NVlabs, HF) or ``(tokens, (H', W'))`` (mmseg) like the replaced
    module. Accepts tokens (B, N, Cin) with ``hw=(H, W)`` too.
    """

    _candidates = ("nvlabs", "hf", "mmseg")

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None):
        y, (H, W) = self._run(x, hw)
        if self._returns == "tokens_hw":
            return y, (H, W)
        return y, H, W


class FusedOverlapPatchEmbedNCHW(FusedOverlapPatchEmbed):
    """The same fused patch embedding for codebases whose module returns the normalised *map*
    (segmentation_models_pytorch: ``proj`` conv, then a LayerNorm applied to the NCHW output).

    Returns a (B, C, H', W') view of the tokens — channels-last memory, no copy — which the next
    block's ``flatten(2).transpose(1, 2)`` turns back into contiguous tokens, again without a copy.
    It is chosen by the ecosystem adapter (the attribute names match NVlabs', the return does not).
    """

    _candidates = ("smp",)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        y, (H, W) = self._run(x, hw)
        return y.view(y.shape[0], H, W, y.shape[2]).permute(0, 3, 1, 2)


class FusedSequenceReduction(_ConvLayerNorm):
    """Sequence reduction of attention: tokens (B, H*W, C) -> tokens (B, H'*W', C), conv k = s = sr
    + LayerNorm fused, read in place (no transpose). Drop-in for HF >= 5.9
    ``SegformerSequenceReduction`` (``sequence_reduction`` / ``layer_norm``); other layouts keep the
    conv and norm inside the attention module (use ``segformer_fast.ops.conv_layernorm``)."""

    _candidates = ("hf_sequence_reduction", "nvlabs")

    def forward(self, hidden_states: Tensor, height: int, width: int) -> Tensor:
        return self._run(hidden_states, (height, width))[0]
