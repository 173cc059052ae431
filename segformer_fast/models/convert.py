"""Weight converters: Hugging Face SegFormer (both layouts) and NVlabs checkpoints -> our model."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from .segformer import VARIANTS, SegFormer

_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


def _copy(dst: nn.Module, src: nn.Module) -> None:
    """Copy parameters/buffers (and eps) of one leaf module into its twin."""
    dst.load_state_dict(src.state_dict())
    if hasattr(src, "eps"):
        dst.eps = src.eps


def _hf_parts(hf):
    """Yield per-stage handles of an HF SegFormer in a layout-independent form."""
    base = hf.segformer
    if hasattr(base, "stages"):          # transformers >= 5.9
        for st in base.stages:
            blocks = []
            for b in st.blocks:
                a = b.attention
                sr = getattr(a, "sequence_reduction", None)
                blocks.append(dict(norm1=b.layernorm_before, norm2=b.layernorm_after, q=a.q_proj,
                                   k=a.k_proj, v=a.v_proj, proj=a.o_proj,
                                   sr=sr.sequence_reduction if sr is not None else None,
                                   sr_norm=sr.layer_norm if sr is not None else None,
                                   fc1=b.mlp.fc1, dw=b.mlp.dwconv.dwconv, fc2=b.mlp.fc2))
            yield st.patch_embeddings.proj, st.patch_embeddings.layer_norm, blocks, st.layer_norm
        return
    if hasattr(base, "encoder"):         # transformers <= 5.8
        enc = base.encoder
        for pe, stage_blocks, norm in zip(enc.patch_embeddings, enc.block, enc.layer_norm):
            blocks = []
            for b in stage_blocks:
                s = b.attention.self
                has_sr = getattr(s, "sr_ratio", 1) > 1
                blocks.append(dict(norm1=b.layer_norm_1, norm2=b.layer_norm_2, q=s.query, k=s.key,
                                   v=s.value, proj=b.attention.output.dense,
                                   sr=s.sr if has_sr else None, sr_norm=s.layer_norm if has_sr else None,
                                   fc1=b.mlp.dense1, dw=b.mlp.dwconv.dwconv, fc2=b.mlp.dense2))
            yield pe.proj, pe.layer_norm, blocks, norm
        return
    raise TypeError(f"from_hf: {type(hf).__name__}.segformer has neither 'stages' nor 'encoder'")


@torch.no_grad()
def from_hf(hf_model) -> SegFormer:
    """Our reference SegFormer carrying the weights (and every eps) of an HF
    ``SegformerForSemanticSegmentation`` — transformers <= 5.8 or >= 5.9 layout.

    K and V projections are packed into ``kv`` (K rows first). The result is in the source's
    train/eval mode, on its device and dtype, and its forward returns logits at H/4 like HF's.
    """
    if not (hasattr(hf_model, "segformer") and hasattr(hf_model, "decode_head")):
        raise TypeError(f"from_hf expects a SegformerForSemanticSegmentation, got {type(hf_model).__name__}")
    cfg = hf_model.config
    act = cfg.hidden_act if isinstance(cfg.hidden_act, str) else "gelu"
    if act not in _GELU:
        raise ValueError(f"from_hf: hidden_act {cfg.hidden_act!r} is not a GELU; expected one of {sorted(_GELU)}")
    model = SegFormer(
        cfg.hidden_sizes, cfg.depths, cfg.decoder_hidden_size, cfg.num_labels, in_chans=cfg.num_channels,
        drop_path_rate=cfg.drop_path_rate, num_heads=cfg.num_attention_heads, sr_ratios=cfg.sr_ratios,
        patch=list(zip(cfg.patch_sizes, cfg.strides)), approximate=_GELU[act],
        mlp_ratios=cfg.mlp_ratios)
    bb = model.backbone
    for i, (proj, ln, blocks, norm) in enumerate(_hf_parts(hf_model), start=1):
        pe = getattr(bb, f"patch_embed{i}")
        _copy(pe.proj, proj)
        _copy(pe.norm, ln)
        _copy(getattr(bb, f"norm{i}"), norm)
        ours = getattr(bb, f"block{i}")
        if len(ours) != len(blocks):
            raise ValueError(f"from_hf: stage {i} has {len(blocks)} blocks, config says {len(ours)}")
        for blk, h in zip(ours, blocks):
            _copy(blk.norm1, h["norm1"])
            _copy(blk.norm2, h["norm2"])
            _copy(blk.attn.q, h["q"])
            blk.attn.kv.weight.copy_(torch.cat([h["k"].weight, h["v"].weight], 0))
            blk.attn.kv.bias.copy_(torch.cat([h["k"].bias, h["v"].bias], 0))
            _copy(blk.attn.proj, h["proj"])
            if h["sr"] is not None:
                _copy(blk.attn.sr, h["sr"])
                _copy(blk.attn.norm, h["sr_norm"])
            _copy(blk.mlp.fc1, h["fc1"])
            _copy(blk.mlp.dwconv.dwconv, h["dw"])
            _copy(blk.mlp.fc2, h["fc2"])
            blk.attn.attn_drop.p = cfg.attention_probs_dropout_prob
            blk.attn.proj_drop.p = blk.mlp.drop.p = cfg.hidden_dropout_prob
    dh = hf_model.decode_head
    projs = dh.linear_projections if hasattr(dh, "linear_projections") else dh.linear_c
    head = model.decode_head
    for i, p in enumerate(projs, start=1):
        _copy(getattr(head, f"linear_c{i}").proj, p.proj)
    _copy(head.linear_fuse.conv, dh.linear_fuse)
    _copy(head.linear_fuse.bn, dh.batch_norm)
    _copy(head.linear_pred, dh.classifier)
    head.dropout = nn.Dropout(dh.dropout.p)  # HF drops elementwise, NVlabs per channel
    ref = next(hf_model.parameters())
    return model.to(device=ref.device, dtype=ref.dtype).train(hf_model.training)


def _unwrap(sd: dict) -> dict:
    for key in ("state_dict", "model"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def from_nvlabs_state_dict(state_dict: dict, num_classes: int | None = None) -> SegFormer:
    """Our SegFormer loaded from an NVlabs/mmseg-0.x SegFormer checkpoint (``torch.load`` result).

    The variant is inferred from the tensors. A backbone-only (ImageNet ``mit_b*``) checkpoint
    loads into the backbone and leaves a freshly initialised head with ``num_classes`` outputs.
    """
    sd = _unwrap(state_dict)
    if not any(k.startswith("backbone.") for k in sd):
        sd = {"backbone." + k: v for k, v in sd.items() if not k.startswith("head.")}
    dims = [sd[f"backbone.patch_embed{i}.proj.weight"].shape[0] for i in range(1, 5)]
    depths = [1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"backbone\.block{i}\.(\d+)\.", k)))
              for i in range(1, 5)]
    matches = [v for v, (d, dp, _) in VARIANTS.items() if d == dims and dp == depths]
    if not matches:
        raise ValueError(f"checkpoint has embed dims {dims} and depths {depths}: no SegFormer variant matches")
    variant = matches[0]
    has_head = "decode_head.linear_pred.weight" in sd
    if has_head:
        n_cls = sd["decode_head.linear_pred.weight"].shape[0]
        if num_classes is not None and num_classes != n_cls:
            raise ValueError(f"num_classes={num_classes} but the checkpoint's head has {n_cls} classes")
        num_classes = n_cls
    elif num_classes is None:
        raise ValueError("backbone-only checkpoint: pass num_classes for the new head")
    from .segformer import segformer

    model = segformer(variant, num_classes)
    sd = {k: v for k, v in sd.items() if not k.startswith("decode_head.conv_seg.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or (has_head and missing) or any(k.startswith("backbone.") for k in missing):
        raise ValueError(f"checkpoint does not match SegFormer-{variant.upper()}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return model


__all__ = ["from_hf", "from_nvlabs_state_dict"]
