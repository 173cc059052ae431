"""``FusedDecodeHead``: SegFormer's All-MLP head with ``linear_fuse`` reassociated.

The head computes ``fuse(concat_i(up(L_i x_i + b_i)))`` with the concat in reversed order
[c4, c3, c2, c1]. Bilinear upsampling is linear per channel, so it commutes with every per-pixel
linear map, and

    fuse(concat_i(up(L_i x_i + b_i))) = sum_i up((F_i L_i) x_i) + sum_i F_i b_i

with F_i the column block of ``linear_fuse`` that meets stage i. The D x C_i product is applied at
each stage's own resolution, so the 4D -> D 1x1 conv at H/4 (more than half of all FLOPs of B0/B2)
disappears; what remains at H/4 is one fused gather (``ops.upsample_sum``) that also applies the
folded bias, eval BatchNorm and ReLU. Exact in real arithmetic, in training and inference:

- eval / no grad: the folded weights and BN affine are cached, keyed on the identity and
  ``_version`` of every parameter and buffer they come from (an optimizer step or
  ``load_state_dict`` bumps the version and invalidates the cache); they are never parameters.
- training with grad: the product is recomputed each forward inside autograd, so gradients reach
  the original ``linear_c``/``linear_fuse`` weights; per stage, the cheaper association is used
  (fold the weights when C_i < B*H_i*W_i, else project then apply F_i at low resolution).
  BatchNorm runs as the original module on the pre-BN sum (batch statistics, running buffers,
  momentum, ``num_batches_tracked`` updated exactly as the original); dropout placement unchanged.

Source layouts are rows of ``LAYOUTS``: attribute paths of the projections, the fuse conv, BN,
activation, dropout and classifier. The replaced module's children are re-registered under the
same names, so Parameters are shared and ``state_dict()`` keys are identical.

mmseg 1.x ``SegformerHead`` is a row too: its per-stage modules are ConvModules (1x1 conv, BN,
ReLU), non-linear, so nothing folds *into* them; they run as the original modules at each stage's
own resolution (``opaque_stages``) and only F_i (the stage's block of ``fusion_conv.conv``, in
stage order: ``reversed_concat=False``) moves before the upsampling. It is a Layout row rather
than a sibling class because everything after the per-stage GEMMs (fusion BN fold or the original
BN in training, fused ReLU, dropout, classifier, the version-keyed cache, backend pinning) is the
same code path; ``validate`` refuses configurations the fused forward does not reproduce.

Every drop-in head keeps the replaced head's other methods and plain attributes reachable
(mmseg 1.x's EncoderDecoder calls ``decode_head.predict``/``loss``, NVlabs' mmseg 0.x calls
``forward_train``/``forward_test``; both end in ``self.forward``, which is then ours).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.upsample_sum import upsample_sum
from ._share import adopt

__all__ = ["FusedDecodeHead", "LAYOUTS"]


def _get(m: nn.Module, path: str):
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def _hf_prepare(head: nn.Module, states: Sequence[Tensor]) -> list[Tensor]:
    # HF's ``reshape_last_stage=False`` branch, reproduced as HF writes it (it takes the side of
    # the square from the *last* dimension) so the outputs stay identical to the replaced module.
    config = getattr(head, "config", None)
    if config is None or getattr(config, "reshape_last_stage", True) is not False:
        return list(states)
    batch = states[-1].shape[0]
    out = []
    for s in states:
        if s.ndim == 3:
            side = int(math.sqrt(s.shape[-1]))
            s = s.reshape(batch, side, side, -1).permute(0, 3, 1, 2).contiguous()
        out.append(s)
    return out


@dataclass(frozen=True)
class Layout:
    """Where a codebase keeps the head's pieces (attribute paths; ``{i}`` is the stage index)."""

    name: str
    detect: Callable[[nn.Module], bool]
    proj: str               # per-stage nn.Linear, formatted with i
    first_stage: int        # index of stage 1 in ``proj`` (1 for linear_c1, 0 for ModuleLists)
    fuse: str
    bn: str
    act: str
    dropout: str
    classifier: str
    prepare: Callable[[nn.Module, Sequence[Tensor]], list[Tensor]] | None = None
    # ``proj`` names whole per-stage modules (NCHW in, D-channel NCHW out) run as-is: nothing of
    # them is folded, only the fuse conv's column block is applied after them at low resolution
    opaque_stages: bool = False
    reversed_concat: bool = True     # the head concatenates [c_n, ..., c_1] (All-MLP) or [c_1, ...]
    # raises TypeError for a head whose configuration the fused forward does not reproduce
    validate: Callable[[nn.Module], None] | None = None
    # ``proj`` entry 0 belongs to the deepest stage (smp), not to stage 1
    proj_deepest_first: bool = False
    # output size from the head's raw arguments, when it is not stage 1's size (smp: input // 4)
    output_size: Callable[[Sequence[Tensor]], tuple[int, int]] | None = None


def _mmseg_prepare(head: nn.Module, inputs: Sequence[Tensor]) -> list[Tensor]:
    # mmseg's _transform_inputs for input_transform="multiple_select" (SegformerHead's)
    index = getattr(head, "in_index", None)
    return [inputs[i] for i in index] if isinstance(index, (list, tuple)) else list(inputs)


def _mmseg_validate(head: nn.Module) -> None:
    fusion = head.fusion_conv
    order = tuple(getattr(fusion, "order", ("conv", "norm", "act")))
    if order != ("conv", "norm", "act"):
        raise TypeError(f"FusedDecodeHead: mmseg fusion_conv order {order} is not (conv, norm, act)")
    if getattr(head, "align_corners", False) or getattr(head, "interpolate_mode", "bilinear") != "bilinear":
        raise TypeError("FusedDecodeHead: mmseg SegformerHead must resize bilinearly with "
                        "align_corners=False")
    if getattr(head, "input_transform", "multiple_select") != "multiple_select":
        raise TypeError("FusedDecodeHead: mmseg SegformerHead input_transform must be multiple_select")


def _smp_prepare(head: nn.Module, features: Sequence[Tensor]) -> list[Tensor]:
    # smp passes [image, (a 0-channel placeholder,) stage 1, ..., stage n]
    return list(features[2:] if features[1].shape[1] == 0 else features[1:])


def _smp_output_size(features: Sequence[Tensor]) -> tuple[int, int]:
    # smp resizes every stage to the *input's* size // 4, which differs from stage 1's size when
    # the input is not a multiple of 4 (e.g. 97 -> 24, stage 1 has 25)
    return features[0].shape[2] // 4, features[0].shape[3] // 4


LAYOUTS = (
    Layout("nvlabs", lambda m: hasattr(m, "linear_c1") and hasattr(_get(m, "linear_fuse"), "conv"),
           "linear_c{i}.proj", 1, "linear_fuse.conv", "linear_fuse.bn", "linear_fuse.activate",
           "dropout", "linear_pred"),
    Layout("hf>=5.9", lambda m: hasattr(m, "linear_projections"),
           "linear_projections.{i}.proj", 0, "linear_fuse", "batch_norm", "activation", "dropout",
           "classifier", _hf_prepare),
    Layout("hf<=5.8", lambda m: isinstance(getattr(m, "linear_c", None), nn.ModuleList),
           "linear_c.{i}.proj", 0, "linear_fuse", "batch_norm", "activation", "dropout",
           "classifier", _hf_prepare),
    Layout("mmseg", lambda m: isinstance(m.convs, nn.ModuleList) and hasattr(m.fusion_conv, "conv"),
           "convs.{i}", 0, "fusion_conv.conv", "fusion_conv.bn", "fusion_conv.activate", "dropout",
           "conv_seg", _mmseg_prepare, opaque_stages=True, reversed_concat=False,
           validate=_mmseg_validate),
    # segmentation_models_pytorch SegformerDecoder: mlp_stage[0] projects the deepest stage, the
    # concat is deepest first like the All-MLP head, fuse_stage = (conv, norm, ReLU), and the
    # output is the fused feature (its classifier lives in the model's segmentation_head)
    Layout("smp", lambda m: hasattr(m, "mlp_stage") and hasattr(m, "fuse_stage"),
           "mlp_stage.{i}.linear", 0, "fuse_stage.0", "fuse_stage.1", "fuse_stage.2", "", "",
           _smp_prepare, proj_deepest_first=True, output_size=_smp_output_size),
)


def _detect(m: nn.Module) -> Layout:
    for layout in LAYOUTS:
        try:
            if layout.detect(m):
                return layout
        except (AttributeError, IndexError, TypeError):
            continue
    raise TypeError(f"FusedDecodeHead.from_module: {type(m).__name__} is not a SegFormer All-MLP head "
                    f"of a known layout ({', '.join(l.name for l in LAYOUTS)})")


class FusedDecodeHead(nn.Module):
    """Drop-in SegFormer All-MLP head (NVlabs/seed/ours, HF <= 5.8, HF >= 5.9) with
    ``linear_fuse`` folded into the per-stage projections and the H/4 epilogue fused; for mmseg
    1.x ``SegformerHead`` only ``fusion_conv``'s 1x1 conv moves before the upsampling.

    Build it with ``FusedDecodeHead.from_module(head, backend=None)``; ``forward`` takes the same
    arguments as the replaced head (the list of 4 stage features, NCHW) and returns its logits
    (B, num_classes, H/4, W/4) — channels-last in memory, which the 1x1 classifier prefers.
    """

    def __init__(self, head: nn.Module, layout: Layout, backend: str | None = None):
        super().__init__()
        if layout.validate is not None:
            layout.validate(head)
        adopt(self, head)
        if hasattr(head, "config"):
            self.config = head.config
        # plain attributes (in_index, num_classes, align_corners, sampler ...) are shared values;
        # nn.Module's own state (underscored, training) is not copied
        for k, v in vars(head).items():
            if not k.startswith("_") and k != "training" and k not in vars(self):
                self.__dict__[k] = v
        self.__dict__["_borrow_cls"] = type(head)
        self.layout = layout
        self.backend = backend
        self.training = head.training       # children keep their own modes (shared modules)
        n = 0
        while True:
            try:
                _get(self, layout.proj.format(i=layout.first_stage + n))
            except (AttributeError, IndexError):
                break
            n += 1
        self.num_stages = n
        fuse = self._fuse_conv()
        D = fuse.weight.shape[0]
        if (fuse.weight.shape[1] != n * D or tuple(fuse.weight.shape[2:]) not in ((1, 1), ())
                or getattr(fuse, "groups", 1) != 1):
            raise TypeError(f"FusedDecodeHead: linear_fuse must be a 1x1 conv {n}*D -> D, got weight "
                            f"{tuple(fuse.weight.shape)}")
        for proj in [] if layout.opaque_stages else self._projections():
            if not isinstance(proj, nn.Linear) or proj.weight.shape[0] != D:
                raise TypeError(f"FusedDecodeHead: stage projections must be nn.Linear(C_i, {D}), got "
                                f"{proj}")
        self._cache_key = None
        self._cache = None

    @classmethod
    def from_module(cls, m: nn.Module, backend: str | None = None) -> "FusedDecodeHead":
        """Wrap an All-MLP head (NVlabs/seed/ours ``SegFormerHead`` or HF ``SegformerDecodeHead``),
        sharing its Parameters and buffers; ``backend`` pins the upsample-sum backend."""
        if isinstance(m, FusedDecodeHead):
            return m
        return cls(m, _detect(m), backend)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            cls = self.__dict__.get("_borrow_cls")
            if cls is None or name.startswith("__"):
                raise
            # the replaced head's plain methods, bound to the drop-in: their self.forward is ours
            fn = inspect.getattr_static(cls, name, None)
            if inspect.isfunction(fn):
                return fn.__get__(self, type(self))
            raise

    # -------------------------------------------------------------------- pieces of the head
    def _projections(self) -> list[nn.Linear]:
        """Per-stage projections in stage order (stage 1 first)."""
        n, lay = self.num_stages, self.layout
        return [_get(self, lay.proj.format(i=lay.first_stage + (n - 1 - k if lay.proj_deepest_first else k)))
                for k in range(n)]

    def _fuse_conv(self) -> nn.Module:
        return _get(self, self.layout.fuse)

    def _part(self, path: str):
        try:
            return _get(self, path)
        except AttributeError:
            return None

    def _bn_eval_affine(self, bn) -> bool:
        return (isinstance(bn, nn.modules.batchnorm._BatchNorm) and not bn.training
                and bn.running_mean is not None and bn.running_var is not None)

    # -------------------------------------------------------------------- folding
    def _sources(self) -> list[Tensor]:
        ts = []
        for p in [] if self.layout.opaque_stages else self._projections():
            ts += [p.weight, p.bias]
        fuse = self._fuse_conv()
        ts += [fuse.weight, fuse.bias]
        bn = self._part(self.layout.bn)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            ts += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        return [t for t in ts if t is not None]

    def _fold(self, tokens_per_stage: Sequence[int] | None, dtype) -> tuple[list, Tensor, bool]:
        """Per stage ("w", D x C_i folded weight) or ("seq", W_i, F_i) for the low-res two-step
        association; the folded bias; whether an eval-mode BatchNorm was folded in too.

        In eval, BatchNorm is an affine map per channel, so it folds into every stage's weights
        (rows scaled) and into the bias: what is left after the upsample-sum is ReLU alone."""
        fuse = self._fuse_conv()
        D = fuse.weight.shape[0]
        n = self.num_stages
        fw = fuse.weight.reshape(D, n * D)
        bias = fuse.bias
        bn = self._part(self.layout.bn)
        bn_folded = self._bn_eval_affine(bn)
        if bn_folded:
            acc = torch.promote_types(bn.running_var.dtype, torch.float32)   # fp32 at least
            inv = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
            scale = inv if bn.weight is None else bn.weight.to(acc) * inv
            shift = -bn.running_mean.to(acc) * scale
            if bn.bias is not None:
                shift = shift + bn.bias.to(acc)
            fw = fw.to(acc) * scale[:, None]
            bias = shift if bias is None else bias.to(acc) * scale + shift
        stages = []
        for i, proj in enumerate(self._projections()):
            j = n - 1 - i if self.layout.reversed_concat else i    # stage i's block of the concat
            blk = fw[:, j * D:(j + 1) * D]
            if self.layout.opaque_stages:
                stages.append(("f", blk.to(dtype)))   # applied to the stage module's output
                continue
            C = proj.weight.shape[1]
            if tokens_per_stage is None or C < tokens_per_stage[i]:
                stages.append(("w", (blk @ proj.weight.to(blk.dtype)).to(dtype)))
            else:
                stages.append(("seq", proj.weight.to(dtype), blk.to(dtype)))
            if proj.bias is not None:
                term = blk @ proj.bias.to(blk.dtype)
                bias = term if bias is None else bias + term
        if bias is None:
            bias = fw.new_zeros(D)
        return stages, bias.to(dtype), bn_folded

    def _folded(self, features: Sequence[Tensor]):
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in self._sources())
        if grad:
            return self._fold([f.shape[0] * f.shape[2] * f.shape[3] for f in features], features[0].dtype)
        key = (tuple((id(t), t._version) for t in self._sources()), features[0].dtype,
               features[0].device, self._bn_eval_affine(self._part(self.layout.bn)))
        if key != self._cache_key:
            with torch.no_grad():
                self._cache = self._fold(None, features[0].dtype)
            self._cache_key = key
        return self._cache

    # -------------------------------------------------------------------- forward
    def forward(self, features=None, **kwargs) -> Tensor:
        if features is None:
            features = kwargs.pop("encoder_hidden_states")
        size = self.layout.output_size(features) if self.layout.output_size is not None else None
        if self.layout.prepare is not None:
            features = self.layout.prepare(self, features)
        features = list(features)
        if len(features) != self.num_stages:
            raise ValueError(f"FusedDecodeHead: expected {self.num_stages} stage features, got "
                             f"{len(features)}")
        for i, f in enumerate(features):
            if f.dim() != 4:
                raise ValueError(f"FusedDecodeHead: feature {i} must be NCHW (B, C, H, W), got shape "
                                 f"{tuple(f.shape)}")
        B = features[-1].shape[0]
        H, W = size if size is not None else features[0].shape[-2:]
        stages, bias, bn_folded = self._folded(features)
        maps, hws = [], []
        modules = self._projections() if self.layout.opaque_stages else [None] * len(stages)
        for i, (f, st, mod) in enumerate(zip(features, stages, modules)):
            if mod is not None:
                # the original stage module (its BN: batch statistics, running-buffer updates)
                f = mod(f)
                if f.dim() != 4 or f.shape[1] != bias.shape[0]:
                    raise ValueError(f"FusedDecodeHead: stage module {i} must return (B, "
                                     f"{bias.shape[0]}, H, W), got {tuple(f.shape)}")
            tokens = f.flatten(2).transpose(1, 2)               # (B, HW, C) view of NCHW
            # The whole folded bias rides on the last (smallest) stage's GEMM for free: bilinear
            # weights sum to one, so upsampling carries a constant through unchanged, and no
            # full-resolution pass is spent adding it.
            b = bias if i == len(stages) - 1 else None
            if st[0] in ("w", "f"):
                y = F.linear(tokens, st[1], b)
            else:
                y = F.linear(F.linear(tokens, st[1]), st[2], b)
            maps.append(y)
            hws.append((f.shape[2], f.shape[3]))
        act = self._part(self.layout.act)
        bn = self._part(self.layout.bn)
        D = bias.shape[0]
        relu = bn_folded and isinstance(act, nn.ReLU)           # fused into the upsample-sum
        x = upsample_sum(maps, hws, (H, W), relu=relu, backend=self.backend)
        x = x.view(B, H, W, D).permute(0, 3, 1, 2)              # NCHW view, channels-last memory
        if bn is not None and not bn_folded:
            x = bn(x)           # the original module: batch statistics and running-buffer updates
        if act is not None and not relu:
            x = act(x)
        drop = self._part(self.layout.dropout)
        if drop is not None:
            # x is channels-last, like the original head's (its tokens -> NCHW views make
            # interpolate, concat and the 1x1 conv channels-last), so even element-wise
            # nn.Dropout draws the same mask from the same seed
            x = drop(x)
        classifier = self._part(self.layout.classifier)
        return x if classifier is None else classifier(x)   # smp classifies outside the decoder

    def extra_repr(self) -> str:
        return f"layout={self.layout.name}, stages={self.num_stages}, backend={self.backend}"
