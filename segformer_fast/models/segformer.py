"""Our own SegFormer B0-B5 (MiT encoder + All-MLP head), pure PyTorch.

Attribute names follow NVlabs' release and the seed document (``backbone.patch_embed1.proj``,
``backbone.block1[j].attn.q/.kv/.proj/.sr/.norm``, ``mlp.fc1/.dwconv.dwconv/.fc2``,
``backbone.norm1..4``, ``decode_head.linear_c1..4.proj``, ``linear_fuse.conv/.bn``,
``linear_pred``) so NVlabs checkpoints load as they are and ``segformer_fast.patch`` treats this
model like any NVlabs-style user model. Every LayerNorm eps is a per-module attribute; defaults
are NVlabs' (1e-6 in blocks and stage norms, 1e-5 in patch embeddings and sequence reduction).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

VARIANTS = {
    # embed dims, depths, decoder width
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
}
HEADS = [1, 2, 5, 8]
SR_RATIOS = [8, 4, 2, 1]
PATCH = [(7, 4), (3, 2), (3, 2), (3, 2)]  # (kernel, stride); padding = kernel // 2
MLP_RATIO = 4


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.floor(torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype,
                                      device=x.device) + keep)
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """Strided conv + LayerNorm; returns (tokens (B, H'W', C), H', W')."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int, eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: Tensor):
        x = self.proj(x)
        _, _, H, W = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class Attention(nn.Module):
    """Efficient (spatial-reduction) self-attention; kv packs K rows first, then V."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, eps: float = 1e-5):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x_ = self.sr(x.permute(0, 2, 1).reshape(B, C, H, W)).reshape(B, C, -1).permute(0, 2, 1)
            x_ = self.norm(x_)
        else:
            x_ = x
        kv = self.kv(x_).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, H, W))
        return x.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 -> depthwise 3x3 conv -> GELU -> dropout -> fc2 -> dropout (NVlabs ``Mlp``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), H, W)))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int, drop_path: float = 0.0,
                 eps: float = 1e-6, sr_eps: float = 1e-5, drop: float = 0.0, attn_drop: float = 0.0,
                 approximate: str = "none", mlp_ratio: int = MLP_RATIO):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, sr_ratio, attn_drop=attn_drop, proj_drop=drop, eps=sr_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop=drop, approximate=approximate)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class MixVisionTransformer(nn.Module):
    """MiT encoder: four stages, each patch embedding -> blocks -> LayerNorm; NCHW outputs."""

    def __init__(self, embed_dims, depths, in_chans: int = 3, drop_path_rate: float = 0.1,
                 eps: float = 1e-6, patch_eps: float = 1e-5, sr_eps: float = 1e-5,
                 num_heads=HEADS, sr_ratios=SR_RATIOS, patch=PATCH, approximate: str = "none",
                 mlp_ratios=(MLP_RATIO,) * 4):
        super().__init__()
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        cur = 0
        prev = in_chans
        for i, (dim, depth) in enumerate(zip(embed_dims, depths), start=1):
            k, s = patch[i - 1]
            setattr(self, f"patch_embed{i}", OverlapPatchEmbed(prev, dim, k, s, eps=patch_eps))
            setattr(self, f"block{i}", nn.ModuleList(
                Block(dim, num_heads[i - 1], sr_ratios[i - 1], dpr[cur + j], eps=eps, sr_eps=sr_eps,
                      approximate=approximate, mlp_ratio=mlp_ratios[i - 1])
                for j in range(depth)))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=eps))
            cur += depth
            prev = dim

    def forward(self, x: Tensor) -> list[Tensor]:
        B = x.shape[0]
        outs = []
        for i in range(1, len(self.embed_dims) + 1):
            x, H, W = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, H, W)
            x = getattr(self, f"norm{i}")(x).reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


class MLP(nn.Module):
    """Per-pixel linear of the decoder: NCHW -> tokens (B, HW, D)."""

    def __init__(self, input_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.flatten(2).transpose(1, 2))


class ConvModule(nn.Module):
    """1x1 conv (no bias) -> BatchNorm -> ReLU (mmcv's ConvModule as SegFormer configures it)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """All-MLP decoder: project, upsample to stage 1, concat [c4, c3, c2, c1], fuse, classify."""

    def __init__(self, in_dims, embed_dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.in_dims = list(in_dims)
        for i, dim in enumerate(in_dims, start=1):
            setattr(self, f"linear_c{i}", MLP(dim, embed_dim))
        self.linear_fuse = ConvModule(embed_dim * len(in_dims), embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features) -> Tensor:
        B, _, H, W = features[0].shape
        outs = []
        for i, f in enumerate(features, start=1):
            y = getattr(self, f"linear_c{i}")(f).permute(0, 2, 1).reshape(B, -1, *f.shape[-2:])
            if y.shape[-2:] != (H, W):
                y = F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)
            outs.append(y)
        x = self.linear_fuse(torch.cat(outs[::-1], dim=1))
        return self.linear_pred(self.dropout(x))


class SegFormer(nn.Module):
    """MiT backbone + All-MLP head. ``forward`` returns logits at H/4 (like Hugging Face), or at
    the input size when ``upsample_logits`` is set (like the seed/NVlabs inference)."""

    def __init__(self, embed_dims, depths, decoder_dim: int, num_classes: int, in_chans: int = 3,
                 drop_path_rate: float = 0.1, upsample_logits: bool = False, **backbone_kwargs):
        super().__init__()
        self.backbone = MixVisionTransformer(embed_dims, depths, in_chans, drop_path_rate,
                                             **backbone_kwargs)
        self.decode_head = SegFormerHead(embed_dims, decoder_dim, num_classes)
        self.upsample_logits = upsample_logits

    def forward(self, x: Tensor) -> Tensor:
        logits = self.decode_head(self.backbone(x))
        if self.upsample_logits:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def _init_weights(m: nn.Module) -> None:
    # NVlabs' initialisation: trunc-normal linears, fan-out normal convs.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def segformer(variant: str = "b0", num_classes: int = 150, **kwargs) -> SegFormer:
    """Build SegFormer-``variant`` (b0..b5) with NVlabs' initialisation.

    Extra keyword arguments go to ``SegFormer`` (e.g. ``drop_path_rate``, ``upsample_logits``,
    ``eps``, ``patch_eps``, ``sr_eps``, ``approximate``).
    """
    key = variant.lower()
    if key not in VARIANTS:
        raise ValueError(f"unknown SegFormer variant {variant!r}: expected one of "
                         f"{', '.join(v.upper() for v in VARIANTS)}")
    dims, depths, decoder_dim = VARIANTS[key]
    model = SegFormer(dims, depths, decoder_dim, num_classes, **kwargs)
    model.apply(_init_weights)
    return model
