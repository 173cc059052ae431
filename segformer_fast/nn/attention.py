"""Drop-in efficient (spatial-reduction) self-attention.

``FusedEfficientAttention.from_module(m)`` keeps ``m``'s child modules under their original
attribute names, so the Parameters are the same objects and ``state_dict()`` keys are unchanged,
and runs:
  q projection → sequence reduction (``ops.conv_layernorm`` on the tokens, no transpose)
  → K and V as one GEMM into (B, M, 2C) whose column halves go to the kernel as strided views
  → ``ops.sra_attention`` (no N x M matrix, no head transposes) → output projection.

A new source layout is one ``Layout`` entry in ``LAYOUTS``.

mmseg 1.x keeps Q, K and V in one ``nn.MultiheadAttention`` (``in_proj_weight`` rows [q; k; v]):
its rows [:C] are the Q weight and rows [C:] are exactly a packed K/V weight (K rows first), so
both are zero-copy slices of the shared Parameter. mmseg also adds the residual inside the module:
``forward(x, hw_shape, identity=None)`` returns ``identity + dropout_layer(proj_drop(out))``.

Attention-probability dropout with p > 0 in training cannot be fused (the kernel never forms the
probabilities): that case, an explicit attention mask, and HF ≤ 5.8's ``output_attentions=True``
run the explicit (reference) attention path on the same projections.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.conv_layernorm import conv_layernorm
from ._share import adopt
from ..ops.sra_attention import sra_attention

__all__ = ["FusedEfficientAttention", "Layout", "LAYOUTS"]


@dataclass(frozen=True)
class Layout:
    """Where one codebase keeps the parts of its attention module (dotted attribute paths)."""

    detect: tuple[str, ...]             # paths that must exist for this layout
    q: str | None                       # Q linear (None: rows [:C] of `in_proj`)
    proj: str
    in_proj: str | None = None          # nn.MultiheadAttention holding packed [q; k; v] rows
    kv: str | None = None               # packed K/V linear (K rows first) ...
    k: str | None = None                # ... or separate K and V linears
    v: str | None = None
    sr: str | None = None               # sequence-reduction conv and its LayerNorm
    norm: str | None = None
    heads: tuple[str, ...] = ()         # first existing path holds the number of heads
    scale: str | None = None            # path of the softmax scale (None: head_dim ** -0.5)
    sr_ratio: tuple[str, ...] = ()      # first existing path holds the reduction ratio
    attn_drop: str | None = None        # nn.Dropout module or float attribute (probabilities)
    proj_drop: str | None = None        # nn.Dropout module after the output projection
    drop_path: str | None = None        # stochastic-depth module after proj_drop ("residual" only)
    seq_first: bool = False             # the source's output projection yields (N, B, C) memory
    #                                     seen as (B, N, C) (mmseg's transposes around
    #                                     nn.MultiheadAttention); dropout masks follow memory
    #                                     order, so a drawing proj_drop gets that layout too
    returns: str = "tensor"             # "tensor" | "out_none" (HF >= 5.9) | "tuple" (HF <= 5.8)
    #                                     | "residual" (mmseg: forward(x, hw_shape, identity=None)
    #                                       -> identity + drop_path(proj_drop(out)))


LAYOUTS: dict[str, Layout] = {
    # NVlabs / seed document / segformer_fast.models: forward(x, H, W) -> tensor
    "nvlabs": Layout(detect=("q", "kv", "proj"), q="q", kv="kv", proj="proj", sr="sr", norm="norm",
                     heads=("num_heads", "head"), scale="scale", sr_ratio=("sr_ratio",),
                     attn_drop="attn_drop", proj_drop="proj_drop", returns="tensor"),
    # HF >= 5.9 SegformerAttention: forward(hidden_states, height, width, attention_mask=None,
    # **kwargs) -> (out, None)
    "hf": Layout(detect=("q_proj", "k_proj", "v_proj", "o_proj"), q="q_proj", k="k_proj", v="v_proj",
                 proj="o_proj", sr="sequence_reduction.sequence_reduction",
                 norm="sequence_reduction.layer_norm", heads=("num_attention_heads",), scale="scaling",
                 sr_ratio=("sequence_reduction_ratio",), attn_drop="attention_dropout",
                 returns="out_none"),
    # HF <= 5.8 SegformerAttention (children `self` and `output`):
    # forward(hidden_states, height, width, output_attentions=False) -> (out,)
    "hf_legacy": Layout(detect=("self.query", "self.key", "self.value", "output.dense"), q="self.query",
                        k="self.key", v="self.value", proj="output.dense", sr="self.sr",
                        norm="self.layer_norm", heads=("self.num_attention_heads",), scale=None,
                        sr_ratio=("self.sr_ratio",), attn_drop="self.dropout",
                        proj_drop="output.dropout", returns="tuple"),
    # mmseg 1.x EfficientMultiheadAttention: forward(x, hw_shape, identity=None) -> tensor with
    # the residual added; `attn` is a stock nn.MultiheadAttention (dropout p kept as a float)
    "mmseg": Layout(detect=("attn.in_proj_weight", "attn.out_proj"), q=None, in_proj="attn",
                    proj="attn.out_proj", sr="sr", norm="norm", heads=("num_heads", "attn.num_heads"),
                    scale=None, sr_ratio=("sr_ratio",), attn_drop="attn.dropout",
                    proj_drop="proj_drop", drop_path="dropout_layer", seq_first=True,
                    returns="residual"),
}

_MISSING = object()


def _get(obj, path: str | None, default=_MISSING):
    if path is None:
        return None if default is _MISSING else default
    for part in path.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            if default is _MISSING:
                raise AttributeError(path)
            return default
    return obj


def _first(obj, paths, default=None):
    for p in paths:
        v = _get(obj, p, None)
        if v is not None:
            return v
    return default


def _check_in_proj(m: nn.Module, mha: nn.Module) -> None:
    """Refuse the ``nn.MultiheadAttention`` options the packed-slice path does not reproduce."""
    why = []
    if not isinstance(mha, nn.MultiheadAttention):
        why.append(f"{type(mha).__name__} is not an nn.MultiheadAttention")
    else:
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            why.append("separate q/k/v projection weights (kdim/vdim != embed_dim)")
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            why.append("add_bias_kv / add_zero_attn")
        # mmseg's wrapper (batch_first=True) hands the inner module (N, B, C): any other pairing
        # attends over a different axis than the tokens
        if mha.batch_first or not getattr(m, "batch_first", True):
            why.append(f"batch_first={getattr(m, 'batch_first', None)} around an inner "
                       f"batch_first={mha.batch_first}")
    if why:
        raise ValueError(f"{type(m).__name__} cannot be fused: {', '.join(why)}")


def detect_layout(m: nn.Module) -> str:
    for name, lay in LAYOUTS.items():
        if all(_get(m, p, None) is not None for p in lay.detect):
            return name
    raise ValueError(f"{type(m).__name__}: not a known efficient-attention layout "
                     f"(tried {', '.join(LAYOUTS)})")


class FusedEfficientAttention(nn.Module):
    """Spatial-reduction attention through ``segformer_fast.ops`` with the replaced module's
    Parameters, ``state_dict()`` keys, forward signature and return convention."""

    def __init__(self, layout: str, num_heads: int, scale: float | None, sr_ratio: int,
                 attn_drop_p: float = 0.0, backend: str | None = None):
        super().__init__()
        self.layout = layout
        self.num_heads = int(num_heads)
        self.scale = scale
        self.sr_ratio = int(sr_ratio)
        self._attn_drop_p = float(attn_drop_p)     # only for layouts that keep p as a float
        self.backend = backend
        self._kv_cache: tuple | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, m: nn.Module, backend: str | None = None) -> "FusedEfficientAttention":
        """Wrap ``m`` (NVlabs/seed/our ``Attention``, HF ≥ 5.9 or ≤ 5.8 ``SegformerAttention``,
        mmseg 1.x ``EfficientMultiheadAttention``),
        sharing its Parameter objects; ``backend`` pins one (None: the process-wide choice)."""
        layout = detect_layout(m)
        lay = LAYOUTS[layout]
        heads = _first(m, lay.heads)
        if heads is None:
            raise ValueError(f"{type(m).__name__}: no number-of-heads attribute ({', '.join(lay.heads)})")
        scale = _get(m, lay.scale, None)
        sr_ratio = _first(m, lay.sr_ratio)
        if sr_ratio is None:                            # infer from the conv when not recorded
            sr = _get(m, lay.sr, None)
            sr_ratio = sr.stride[0] if isinstance(sr, nn.Conv2d) else 1
        if lay.in_proj is not None:
            _check_in_proj(m, _get(m, lay.in_proj))
        drop = _get(m, lay.attn_drop, None)
        fused = cls(layout, heads, None if scale is None else float(scale), sr_ratio,
                    attn_drop_p=drop if isinstance(drop, (int, float)) else 0.0, backend=backend)
        fused.train(m.training)
        adopt(fused, m)
        if fused.sr_ratio > 1:
            sr, norm = _get(fused, lay.sr, None), _get(fused, lay.norm, None)
            if not isinstance(sr, nn.Conv2d) or not isinstance(norm, nn.LayerNorm):
                raise ValueError(f"{type(m).__name__}: sr_ratio={fused.sr_ratio} but no Conv2d/LayerNorm "
                                 f"at {lay.sr!r}/{lay.norm!r}")
        return fused

    # ------------------------------------------------------------------ parts
    def _part(self, name: str):
        return _get(self, getattr(LAYOUTS[self.layout], name), None)

    def _q_weight(self) -> tuple[Tensor, Tensor | None]:
        if LAYOUTS[self.layout].in_proj is not None:
            mha = self._part("in_proj")
            c, b = mha.embed_dim, mha.in_proj_bias
            return mha.in_proj_weight[:c], None if b is None else b[:c]
        q = self._part("q")
        return q.weight, q.bias

    def _kv_weight(self) -> tuple[Tensor, Tensor | None]:
        """(2C, C) weight and (2C,) bias of the fused K/V GEMM (K rows first)."""
        lay = LAYOUTS[self.layout]
        if lay.in_proj is not None:                 # rows [C:3C] of [q; k; v]: a view, no copy
            mha = self._part("in_proj")
            c, b = mha.embed_dim, mha.in_proj_bias
            return mha.in_proj_weight[c:], None if b is None else b[c:]
        if lay.kv is not None:
            kv = self._part("kv")
            return kv.weight, kv.bias
        k, v = self._part("k"), self._part("v")
        ts = (k.weight, v.weight, k.bias, v.bias)
        needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)
        key = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) if t is not None else None
                    for t in ts)
        if not needs_graph and self._kv_cache is not None and self._kv_cache[0] == key:
            return self._kv_cache[1], self._kv_cache[2]
        w = torch.cat([k.weight, v.weight], 0)
        if k.bias is None and v.bias is None:
            b = None
        else:
            b = torch.cat([k.bias if k.bias is not None else k.weight.new_zeros(k.out_features),
                           v.bias if v.bias is not None else v.weight.new_zeros(v.out_features)])
        # a cached tensor carries no autograd graph: cache only when no gradient is recorded
        self._kv_cache = None if needs_graph else (key, w, b)
        return w, b

    def _attn_drop_p_now(self) -> float:
        if not self.training:
            return 0.0
        drop = self._part("attn_drop")
        if isinstance(drop, nn.Dropout):
            return float(drop.p)
        # a float still reachable on a kept child (mmseg's nn.MultiheadAttention.dropout) is read
        # live; one that lived on the replaced module itself (HF) was recorded at wrap time
        return float(drop) if isinstance(drop, (int, float)) else self._attn_drop_p

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if LAYOUTS[self.layout].returns == "residual":
            return self._forward_residual(hidden_states, *args, **kwargs)
        return self._forward_h_w(hidden_states, *args, **kwargs)

    def _forward_residual(self, x: Tensor, hw_shape: tuple[int, int], identity: Tensor | None = None):
        """mmseg: ``identity + dropout_layer(proj_drop(attn(x)))``, identity defaulting to x."""
        out, _ = self._attend(x, hw_shape[0], hw_shape[1], None, False)
        drop_path = self._part("drop_path")
        if drop_path is not None:
            out = drop_path(out)
        return (x if identity is None else identity) + out

    def _forward_h_w(self, hidden_states: Tensor, height: int, width: int, *args, **kwargs):
        mask = None
        want_probs = False
        if self.layout == "hf":
            mask = args[0] if args else kwargs.get("attention_mask")
        elif self.layout == "hf_legacy":
            want_probs = bool(args[0] if args else kwargs.get("output_attentions", False))
        out, probs = self._attend(hidden_states, height, width, mask, want_probs)
        returns = LAYOUTS[self.layout].returns
        if returns == "tensor":
            return out
        if returns == "out_none":
            return out, None
        return (out, probs) if want_probs else (out,)

    def _attend(self, x: Tensor, H: int, W: int, mask: Tensor | None, want_probs: bool):
        B, N, C = x.shape
        q = F.linear(x, *self._q_weight())
        if self.sr_ratio > 1:
            sr, norm = self._part("sr"), self._part("norm")
            x_kv, _ = conv_layernorm(x, sr.weight, sr.bias, norm.weight, norm.bias, stride=sr.stride,
                                     padding=sr.padding, eps=norm.eps, hw=(H, W), backend=self.backend)
        else:
            x_kv = x
        w, b = self._kv_weight()
        kv = F.linear(x_kv, w, b)                   # (B, M, 2C): one GEMM for K and V
        k, v = kv[..., :C], kv[..., C:]             # strided views (row stride 2C), never copied
        p = self._attn_drop_p_now()
        probs = None
        if p > 0.0 or mask is not None or want_probs:
            out, probs = self._explicit(q, k, v, p, mask)
        else:
            out = sra_attention(q, k, v, self.num_heads, self.scale, backend=self.backend)
        proj = self._part("proj")
        drop = self._part("proj_drop")
        draws = drop is not None and self.training and getattr(drop, "p", 1.0) > 0.0
        if draws and LAYOUTS[self.layout].seq_first:     # same mask as the source (one extra copy)
            out = F.linear(out.transpose(0, 1), proj.weight, proj.bias).transpose(0, 1)
        else:
            out = F.linear(out, proj.weight, proj.bias)
        if drop is not None:
            out = drop(out)
        return out, probs

    def _explicit(self, q: Tensor, k: Tensor, v: Tensor, p: float, mask: Tensor | None):
        """The unfused path (probabilities materialised) for dropout on them, masks, or returning them."""
        B, N, C = q.shape
        h = self.num_heads
        d = C // h
        scale = d ** -0.5 if self.scale is None else self.scale
        qh = q.unflatten(2, (h, d)).transpose(1, 2)
        kh = k.unflatten(2, (h, d)).transpose(1, 2)
        vh = v.unflatten(2, (h, d)).transpose(1, 2)
        attn = (qh @ kh.transpose(-2, -1)) * scale
        if mask is not None:
            attn = attn + mask
        attn = attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        attn = F.dropout(attn, p=p, training=self.training)
        return (attn @ vh).transpose(1, 2).reshape(B, N, C), attn

    def extra_repr(self) -> str:
        return (f"layout={self.layout}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, "
                f"backend={self.backend}")
