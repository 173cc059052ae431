"""``FusedMixFFN``: drop-in Mix-FFN (fc1 -> dwconv 3x3 -> GELU -> dropout -> fc2 -> dropout) whose
middle runs as one ``segformer_fast.ops.dwconv_gelu`` pass on tokens.

The replaced module's children stay under their own attribute names (``fc1``/``dense1``,
``dwconv`` holding ``dwconv``, ``fc2``/``dense2``, the activation and dropout modules), so the
Parameters are the same objects and ``state_dict()`` keys are unchanged. A new source layout is
one ``Layout`` entry in ``LAYOUTS``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.dwconv_gelu import dwconv_gelu

__all__ = ["FusedMixFFN", "Layout", "LAYOUTS", "gelu_kind"]


@dataclass(frozen=True)
class Layout:
    """Attribute names of one codebase's Mix-FFN. ``act``/``drop`` None: the source has no such
    attribute (the seed calls ``F.gelu`` exactly and has no dropout)."""

    name: str
    fc1: str
    fc2: str
    act: str | None
    drop: str | None
    dwconv: str = "dwconv"      # the wrapper module; its ``.dwconv`` is the nn.Conv2d


# First match wins: layouts with an activation attribute before the bare seed layout.
LAYOUTS = (
    Layout("nvlabs", fc1="fc1", fc2="fc2", act="act", drop="drop"),
    Layout("hf>=5.9", fc1="fc1", fc2="fc2", act="activation_fn", drop="dropout"),
    Layout("hf<=5.8", fc1="dense1", fc2="dense2", act="intermediate_act_fn", drop="dropout"),
    Layout("seed", fc1="fc1", fc2="fc2", act=None, drop=None),
)

# transformers' activation classes by name (the class objects differ between versions).
_HF_TANH = {"NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"}


def gelu_kind(act) -> str:
    """The ``approximate`` argument reproducing activation ``act`` exactly, or ValueError."""
    if act is None or act is F.gelu:
        return "none"
    if isinstance(act, nn.GELU):
        return act.approximate
    cls = type(act).__name__
    if cls == "GELUActivation":           # HF ACT2FN["gelu"] / ["gelu_python"]: erf form
        return "none"
    if cls in _HF_TANH:                   # "gelu_new", "gelu_pytorch_tanh", "gelu_fast"
        return "tanh"
    raise ValueError(f"FusedMixFFN: cannot reproduce activation {act!r} ({cls}); supported: "
                     "nn.GELU, F.gelu and transformers' GELUActivation / NewGELUActivation / "
                     "GELUTanh / FastGELUActivation")


def _layout_of(m: nn.Module) -> Layout:
    for lay in LAYOUTS:
        names = [lay.fc1, lay.fc2] + [n for n in (lay.act, lay.drop) if n is not None]
        if all(hasattr(m, n) for n in names) and hasattr(getattr(m, lay.dwconv, None), "dwconv"):
            return lay
    raise ValueError(f"FusedMixFFN: {type(m).__name__} matches no known Mix-FFN layout "
                     f"({', '.join(l.name for l in LAYOUTS)})")


class FusedMixFFN(nn.Module):
    """Mix-FFN with the depthwise conv + bias + GELU fused; ``forward(x, H, W)`` -> tokens."""

    def __init__(self, layout: Layout, children: dict[str, nn.Module], approximate: str,
                 backend: str | None = None):
        super().__init__()
        self.layout = layout
        self.approximate = approximate
        self.backend = backend
        for name, child in children.items():
            if isinstance(child, nn.Module):
                self.add_module(name, child)
            else:                          # e.g. HF config.hidden_act given as a plain function
                object.__setattr__(self, name, child)

    @classmethod
    def from_module(cls, m: nn.Module, backend: str | None = None) -> "FusedMixFFN":
        """Wrap ``m`` (NVlabs/seed/ours, HF <= 5.8 or HF >= 5.9 Mix-FFN), sharing its modules and
        Parameters. Raises ValueError for an unknown layout or an activation it cannot match."""
        lay = _layout_of(m)
        conv = getattr(m, lay.dwconv).dwconv
        if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.padding == (1, 1) and conv.dilation == (1, 1)
                and conv.groups == conv.in_channels == conv.out_channels
                and conv.padding_mode == "zeros"):
            raise ValueError(f"FusedMixFFN: {lay.dwconv}.dwconv must be a depthwise 3x3 conv, stride 1, "
                             f"zero padding 1; got {conv!r}")
        approximate = gelu_kind(getattr(m, lay.act) if lay.act else None)
        names = [lay.fc1, lay.dwconv, lay.fc2] + [n for n in (lay.act, lay.drop) if n is not None]
        return cls(lay, {n: getattr(m, n) for n in names}, approximate, backend)

    def _drop(self, x: Tensor) -> Tensor:
        return x if self.layout.drop is None else getattr(self, self.layout.drop)(x)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        lay = self.layout
        conv = getattr(self, lay.dwconv).dwconv
        h = getattr(self, lay.fc1)(x)
        h = dwconv_gelu(h, (H, W), conv.weight, conv.bias, self.approximate, backend=self.backend)
        # Same dropout module, same places as the sources: after the activation and after fc2.
        return self._drop(getattr(self, lay.fc2)(self._drop(h)))

    def extra_repr(self) -> str:
        return f"layout={self.layout.name}, approximate={self.approximate!r}, backend={self.backend!r}"
