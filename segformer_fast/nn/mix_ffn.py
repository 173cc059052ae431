"""``FusedMixFFN``: drop-in Mix-FFN (fc1 -> dwconv 3x3 -> GELU -> dropout -> fc2 -> dropout) whose
middle runs as one ``segformer_fast.ops.dwconv_gelu`` pass on tokens.

The replaced module's children stay under their own attribute names (``fc1``/``dense1``,
``dwconv`` holding ``dwconv``, ``fc2``/``dense2``, the activation and dropout modules), so the
Parameters are the same objects and ``state_dict()`` keys are unchanged. A new source layout is
one ``Layout`` entry in ``LAYOUTS``.

mmseg 1.x keeps the parts in one ``nn.Sequential`` ``layers`` = [fc1, pe_conv, activate, drop, fc2,
drop] with fc1/fc2 as 1x1 ``nn.Conv2d``: their (out, in, 1, 1) weights run as linear weights through
views (no copies), and its ``forward(x, hw_shape, identity=None)`` adds the residual inside,
returning ``identity + dropout_layer(out)``.
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
    """Attribute paths (dotted) of one codebase's Mix-FFN. ``act``/``drop`` None: the source has
    no such attribute (the seed calls ``F.gelu`` exactly and has no dropout)."""

    name: str
    fc1: str                    # nn.Linear, or a 1x1 nn.Conv2d (run as a linear through a view)
    fc2: str
    act: str | None
    drop: str | None            # dropout after the activation ...
    drop2: str | None = None    # ... and after fc2 (None: the same module as ``drop``)
    dwconv: str = "dwconv.dwconv"   # the depthwise 3x3 nn.Conv2d
    drop_path: str | None = None    # residual inside: forward(x, hw_shape, identity=None) returns
    #                                 identity + drop_path(out) (mmseg); None: forward(x, H, W)
    sequence: str | None = None     # an nn.Sequential that must hold exactly these parts, in order
    drop_nchw: bool = False         # the source's dropouts see (B, C, H, W) maps: they get the same
    #                                 shape and strides (a free view of the tokens), so the random
    #                                 masks are drawn alike whether a backend follows logical or
    #                                 memory order

    def paths(self) -> list[str]:
        return [p for p in (self.fc1, self.dwconv, self.act, self.drop, self.fc2, self.drop2)
                if p is not None]


# First match wins: layouts with an activation attribute before the bare seed layout.
LAYOUTS = (
    Layout("mmseg", fc1="layers.0", dwconv="layers.1", act="layers.2", drop="layers.3",
           fc2="layers.4", drop2="layers.5", drop_path="dropout_layer", sequence="layers",
           drop_nchw=True),
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


def _get(m, path: str):
    for part in path.split("."):
        m = getattr(m, part, None)
    return m


def _pointwise(mod: nn.Module, x: Tensor) -> Tensor:
    """``mod`` on tokens: a 1x1 conv runs as a linear on a view of its weight (same storage)."""
    if isinstance(mod, nn.Conv2d):
        w = mod.weight
        return F.linear(x, w.view(w.shape[0], -1), mod.bias)
    return mod(x)


def _check_pointwise(name: str, mod: nn.Module) -> None:
    if not isinstance(mod, nn.Conv2d):     # token-wise modules (nn.Linear) are called as they are
        return
    if not (mod.kernel_size == (1, 1) and mod.stride == (1, 1)
            and mod.padding in ((0, 0), "valid") and mod.groups == 1):
        raise ValueError(f"FusedMixFFN: {name} must be a token-wise module (nn.Linear) or a 1x1 "
                         f"conv (stride 1, no padding, groups 1); got {mod!r}")


def _layout_of(m: nn.Module) -> Layout:
    for lay in LAYOUTS:
        extra = [lay.drop_path] if lay.drop_path is not None else []
        if all(_get(m, p) is not None for p in lay.paths() + extra):
            return lay
    raise ValueError(f"FusedMixFFN: {type(m).__name__} matches no known Mix-FFN layout "
                     f"({', '.join(l.name for l in LAYOUTS)})")


class FusedMixFFN(nn.Module):
    """Mix-FFN with the depthwise conv + bias + GELU fused; ``forward(x, H, W)`` -> tokens, or
    mmseg's ``forward(x, hw_shape, identity=None)`` -> identity + drop_path(tokens)."""

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
        """Wrap ``m`` (NVlabs/seed/ours, HF <= 5.8 or HF >= 5.9 Mix-FFN, mmseg 1.x ``MixFFN``),
        sharing its modules and Parameters. Raises ValueError for an unknown layout or an activation it cannot match."""
        lay = _layout_of(m)
        if lay.sequence is not None:
            seq = _get(m, lay.sequence)
            if [id(c) for c in seq] != [id(_get(m, p)) for p in lay.paths()]:
                raise ValueError(f"FusedMixFFN: {lay.sequence} must be exactly [{', '.join(lay.paths())}] "
                                 f"in this order; got {[type(c).__name__ for c in seq]}")
        for name in (lay.fc1, lay.fc2):
            _check_pointwise(name, _get(m, name))
        conv = _get(m, lay.dwconv)
        if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.padding == (1, 1) and conv.dilation == (1, 1)
                and conv.groups == conv.in_channels == conv.out_channels
                and conv.padding_mode == "zeros"):
            raise ValueError(f"FusedMixFFN: {lay.dwconv} must be a depthwise 3x3 conv, stride 1, "
                             f"zero padding 1; got {conv!r}")
        approximate = gelu_kind(_get(m, lay.act) if lay.act else None)
        # re-register the top-level owners of every part: the same objects under the same keys
        names = dict.fromkeys(p.split(".")[0] for p in lay.paths() + [lay.drop_path] if p is not None)
        return cls(lay, {n: getattr(m, n) for n in names}, approximate, backend)

    def _drop(self, x: Tensor, path: str | None, hw: tuple[int, int]) -> Tensor:
        if path is None:
            return x
        if self.layout.drop_nchw:       # tokens (B, N, C) <-> channels-last (B, C, H, W): views
            return _get(self, path)(x.transpose(1, 2).unflatten(2, hw)).flatten(2).transpose(1, 2)
        return _get(self, path)(x)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.layout.drop_path is None:
            return self._ffn(x, *args, **kwargs)
        return self._forward_residual(x, *args, **kwargs)

    def _forward_residual(self, x: Tensor, hw_shape: tuple[int, int], identity: Tensor | None = None):
        out = _get(self, self.layout.drop_path)(self._ffn(x, hw_shape[0], hw_shape[1]))
        return (x if identity is None else identity) + out

    def _ffn(self, x: Tensor, H: int, W: int) -> Tensor:
        lay = self.layout
        conv = _get(self, lay.dwconv)
        h = _pointwise(_get(self, lay.fc1), x)
        h = dwconv_gelu(h, (H, W), conv.weight, conv.bias, self.approximate, backend=self.backend)
        # Same dropout modules, same places as the sources: after the activation and after fc2.
        h = self._drop(h, lay.drop, (H, W))
        h = _pointwise(_get(self, lay.fc2), h)
        return self._drop(h, lay.drop2 if lay.drop2 is not None else lay.drop, (H, W))

    def extra_repr(self) -> str:
        return f"layout={self.layout.name}, approximate={self.approximate!r}, backend={self.backend!r}"
