"""segmentation_models_pytorch's MiT encoder, through stand-ins.

smp cannot be imported here (its encoders import timm, which needs a torchvision built for the
installed torch), so these stand-ins reproduce smp's encoder conventions as its source defines
them: blocks take and return NCHW maps, the patch embedding returns the LayerNorm-ed NCHW map
(smp's LayerNorm accepts 4D input), attention and Mix-FFN are NVlabs' (tokens in, tokens out).
Their ``__module__`` is smp's, which is how the adapter recognises the ecosystem.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import segformer_fast
from segformer_fast.models.segformer import Attention, DropPath, MixFFN
from segformer_fast.testing import init_realistic_

from test_patch import grad_parts, rel_err

SMP = "segmentation_models_pytorch.encoders.mix_transformer"


class LayerNorm(nn.LayerNorm):
    """smp's LayerNorm: normalises channels of a 4D map as well as of tokens."""

    def forward(self, x):
        if x.dim() == 4:
            B, C, H, W = x.shape
            y = F.layer_norm(x.view(B, C, -1).transpose(1, 2), self.normalized_shape, self.weight,
                             self.bias, self.eps)
            return y.transpose(1, 2).view(B, C, H, W)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class OverlapPatchEmbed(nn.Module):
    def __init__(self, cin, dim, k, s):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, k, s, k // 2)
        self.norm = LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x))


class Block(nn.Module):
    def __init__(self, dim, heads, sr, dpr):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads, sr)
        self.drop_path = DropPath(dpr) if dpr > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = MixFFN(dim, 4 * dim)

    def forward(self, x):
        B, _, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        x = x + self.drop_path(self.mlp(self.norm2(x), H, W))
        return x.transpose(1, 2).view(B, -1, H, W)


class MixVisionTransformerEncoder(nn.Module):
    def __init__(self, dims=(32, 64, 64, 64), heads=(1, 2, 2, 2), srs=(8, 4, 2, 1), depth=1, dpr=0.1):
        super().__init__()
        cin = 3
        for i, (d, h, sr) in enumerate(zip(dims, heads, srs), start=1):
            k, s = (7, 4) if i == 1 else (3, 2)
            setattr(self, f"patch_embed{i}", OverlapPatchEmbed(cin, d, k, s))
            setattr(self, f"block{i}", nn.Sequential(*[Block(d, h, sr, dpr) for _ in range(depth)]))
            setattr(self, f"norm{i}", LayerNorm(d))
            cin = d

    def forward(self, x):
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            x = getattr(self, f"block{i}")(x)
            x = getattr(self, f"norm{i}")(x).contiguous()
            outs.append(x)
        return outs


class Segformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = MixVisionTransformerEncoder()

    def forward(self, x):
        return torch.cat([f.flatten(1) for f in self.encoder(x)], 1)


for cls in (LayerNorm, OverlapPatchEmbed, Block, MixVisionTransformerEncoder, Segformer):
    cls.__module__ = SMP


def _model():
    torch.manual_seed(0)
    return init_realistic_(Segformer(), seed=5)


def test_smp_encoder_patched_matches():
    model = _model()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = segformer_fast.patch(model)
    assert report.ecosystem == "segmentation_models_pytorch"
    assert sum(".patch_embed" in p for p in report.replaced) == 4
    assert sum(p.endswith(".attn") for p in report.replaced) == 4
    assert sum(p.endswith(".mlp") for p in report.replaced) == 4
    assert not report.skipped
    assert list(model.state_dict()) == keys
    assert segformer_fast.patch(model).replaced == []
    x = torch.randn(2, 3, 67, 61)
    model.eval(), ref.eval()
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) <= 1e-4
    model.train(), ref.train()
    grads = []
    for m in (model, ref):
        torch.manual_seed(7)
        out = m(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[1].items():
        for part, ref_part, scale in grad_parts(name, grads[0][name], g, grads[1]):
            assert ((part - ref_part).abs().max() / scale.clamp_min(1e-12)).item() <= 1e-3, name
    assert segformer_fast.unpatch(model) == len(report.replaced)


def test_nchw_patch_embed_returns_a_channels_last_view(monkeypatch):
    import segformer_fast.nn.patch_embed as P

    torch.manual_seed(1)
    pe = init_realistic_(OverlapPatchEmbed(3, 32, 7, 4), seed=2)
    fused = copy.deepcopy(pe)
    assert segformer_fast.patch(fused).replaced == ["OverlapPatchEmbed"]
    calls = []
    op = P.conv_layernorm
    monkeypatch.setattr(P, "conv_layernorm", lambda *a, **k: calls.append(1) or op(*a, **k))
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        y, r = fused(x), pe(x)
    assert y.shape == r.shape == (2, 32, 12, 16)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, r) <= 1e-5
    tokens = y.flatten(2).transpose(1, 2)          # what smp's next block does: no copy
    assert tokens.is_contiguous() and tokens.data_ptr() == y.data_ptr()
    assert calls == [1]           # smp's LayerNorm subclass is vouched for: the fused op ran


def test_nvlabs_models_keep_the_token_patch_embedding():
    from segformer_fast.models import segformer

    m = segformer("b0", 3)
    segformer_fast.patch(m)
    tokens, H, W = m.backbone.patch_embed1(torch.randn(1, 3, 32, 40))
    assert tokens.shape == (1, 8 * 10, 32) and (H, W) == (8, 10)


# ---------------------------------------------------------------- smp's own source (tests/smp_source.py)
class SmpSegformer(nn.Module):
    """smp.Segformer's composition: encoder -> SegformerDecoder -> SegmentationHead (x4 upsampling)."""

    def __init__(self, smp, variant="mit_b0", classes=7, seg_channels=256):
        super().__init__()
        mt = smp["mix_transformer"]
        spec = mt.mix_transformer_encoders[variant]
        self.encoder = spec["encoder"](depth=5, **spec["params"])
        self.decoder = smp["decoder"].SegformerDecoder(self.encoder.out_channels, 5, seg_channels)
        self.segmentation_head = smp["heads"].SegmentationHead(seg_channels, classes, kernel_size=1,
                                                               upsampling=4)

    def forward(self, x):
        return self.segmentation_head(self.decoder(self.encoder(x)))


@pytest.fixture(scope="module")
def smp():
    from smp_source import load

    return load()


@pytest.mark.parametrize("shape", [(2, 3, 97, 131), (1, 3, 64, 96)])
def test_real_smp_segformer_patched_matches(smp, shape):
    torch.manual_seed(0)
    model = init_realistic_(SmpSegformer(smp), seed=3)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = segformer_fast.patch(model)
    assert report.ecosystem == "segmentation_models_pytorch" and not report.skipped, str(report)
    assert "decoder" in report.replaced
    assert len(report.replaced) == 4 + 8 + 8 + 1
    assert list(model.state_dict()) == keys
    assert segformer_fast.patch(model).replaced == []
    x = torch.randn(*shape)
    model.eval(), ref.eval()
    with torch.no_grad():
        a, b = model(x), ref(x)
    assert a.shape == b.shape and rel_err(a, b) <= 1e-4, rel_err(a, b)
    model.train(), ref.train()
    grads = []
    for m in (model, ref):
        torch.manual_seed(11)                          # same DropPath draws
        out = m(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[1].items():
        for part, ref_part, scale in grad_parts(name, grads[0][name], g, grads[1]):
            err = ((part - ref_part).abs().max() / scale.clamp_min(1e-12)).item()
            assert err <= 1e-3, f"{name}: {err:.2e}"
    for (n, s), (_, t) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(s, t, msg=n)


def test_real_smp_decoder_flops_drop(smp):
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    dec = smp["decoder"].SegformerDecoder([3, 0, 32, 64, 160, 256], 5, 256).eval()
    feats = [torch.randn(1, 3, 512, 512), torch.empty(1, 0, 256, 256)] + [
        torch.randn(1, c, 512 // s, 512 // s) for c, s in zip([32, 64, 160, 256], [4, 8, 16, 32])]
    fused = copy.deepcopy(dec)
    assert segformer_fast.patch(fused).replaced == ["SegformerDecoder"]
    counts = []
    for m in (dec, fused):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(feats)
        counts.append(fc.get_total_flops())
    assert counts[1] < 0.25 * counts[0], counts
