"""segformer_fast.patch on mmseg 1.x's MixVisionTransformer.

mmseg needs mmcv's compiled ops and cannot be installed here, so the modules below are stand-ins
written from mmseg 1.x's source semantics: the same attribute names (hence state_dict keys), the
same forward arithmetic (including the (N, B, C) transposes around a stock nn.MultiheadAttention)
and the same order of random draws (attention dropout, proj_drop, DropPath; ffn dropout twice,
DropPath). They are not mmseg's code and are not tested against mmseg itself.
"""
import copy
import importlib
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import segformer_fast
from segformer_fast.nn import (FusedDecodeHead, FusedEfficientAttention, FusedMixFFN,
                               FusedOverlapPatchEmbed)
from segformer_fast.testing import init_realistic_


# ----------------------------------------------------------------------------- stand-ins
def nlc_to_nchw(x, hw_shape):
    B, _, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *hw_shape)


def nchw_to_nlc(x):
    return x.flatten(2).transpose(1, 2)


class DropPath(nn.Module):
    """Stochastic depth per sample: one uniform draw per sample from the global RNG."""

    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype)).floor()
        return x / keep * mask


class PatchEmbed(nn.Module):
    def __init__(self, cin, c, k, s, p, eps=1e-6):
        super().__init__()
        self.adap_padding = None
        self.projection = nn.Conv2d(cin, c, k, s, p)
        self.norm = nn.LayerNorm(c, eps=eps)

    def forward(self, x):
        if self.adap_padding:
            x = self.adap_padding(x)
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(nchw_to_nlc(x)), hw


class EfficientMultiheadAttention(nn.Module):
    def __init__(self, embed_dims, num_heads, attn_drop=0.0, proj_drop=0.0, drop_path=0.0,
                 qkv_bias=True, sr_ratio=1, batch_first=True):
        super().__init__()
        self.embed_dims, self.num_heads, self.batch_first = embed_dims, num_heads, batch_first
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=attn_drop, bias=qkv_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dropout_layer = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(embed_dims, embed_dims, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(embed_dims, eps=1e-6)

    def forward(self, x, hw_shape, identity=None):
        x_q = x
        x_kv = self.norm(nchw_to_nlc(self.sr(nlc_to_nchw(x, hw_shape)))) if self.sr_ratio > 1 else x
        if identity is None:
            identity = x_q
        if self.batch_first:
            x_q, x_kv = x_q.transpose(0, 1), x_kv.transpose(0, 1)
        out = self.attn(query=x_q, key=x_kv, value=x_kv)[0]
        if self.batch_first:
            out = out.transpose(0, 1)
        return identity + self.dropout_layer(self.proj_drop(out))


class MixFFN(nn.Module):
    def __init__(self, c, hidden, ffn_drop=0.0, drop_path=0.0, act=None):
        super().__init__()
        drop = nn.Dropout(ffn_drop)
        self.layers = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
                                    act if act is not None else nn.GELU(), drop, nn.Conv2d(hidden, c, 1), drop)
        self.dropout_layer = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, hw_shape, identity=None):
        out = nchw_to_nlc(self.layers(nlc_to_nchw(x, hw_shape)))
        return (x if identity is None else identity) + self.dropout_layer(out)


class TransformerEncoderLayer(nn.Module):
    def __init__(self, c, heads, sr, drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, eps=1e-6)
        self.attn = EfficientMultiheadAttention(c, heads, attn_drop, drop, drop_path, sr_ratio=sr)
        self.norm2 = nn.LayerNorm(c, eps=1e-6)
        self.ffn = MixFFN(c, 4 * c, drop, drop_path)

    def forward(self, x, hw_shape):
        x = self.attn(self.norm1(x), hw_shape, identity=x)
        return self.ffn(self.norm2(x), hw_shape, identity=x)


class MixVisionTransformer(nn.Module):
    def __init__(self, dims=(32, 64, 64, 64), heads=(1, 2, 2, 2), depths=(1, 1, 1, 1), srs=(8, 4, 2, 1),
                 drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.layers = nn.ModuleList()
        cin = 3
        for i, (c, h, d, sr) in enumerate(zip(dims, heads, depths, srs)):
            embed = PatchEmbed(cin, c, 7, 4, 3) if i == 0 else PatchEmbed(cin, c, 3, 2, 1)
            blocks = nn.ModuleList([TransformerEncoderLayer(c, h, sr, drop, attn_drop, drop_path)
                                    for _ in range(d)])
            self.layers.append(nn.ModuleList([embed, blocks, nn.LayerNorm(c, eps=1e-6)]))
            cin = c

    def forward(self, x):
        outs = []
        for embed, blocks, norm in self.layers:
            x, hw = embed(x)
            for block in blocks:
                x = block(x, hw)
            x = nlc_to_nchw(norm(x), hw)
            outs.append(x)
        return outs


class ConvModule(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class SegformerHead(nn.Module):
    def __init__(self, in_channels=(32, 64, 64, 64), channels=32, num_classes=5):
        super().__init__()
        self.in_index = list(range(len(in_channels)))
        self.align_corners = False
        self.num_classes = num_classes
        self.convs = nn.ModuleList([ConvModule(c, channels) for c in in_channels])
        self.fusion_conv = ConvModule(channels * len(in_channels), channels)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def _transform_inputs(self, inputs):
        return [inputs[i] for i in self.in_index]

    def cls_seg(self, feat):
        return self.conv_seg(self.dropout(feat) if self.dropout is not None else feat)

    def predict(self, inputs, img_shape):
        # mmseg's predict: forward, then predict_by_feat resizes the logits to the image
        return F.interpolate(self.forward(inputs), size=img_shape, mode="bilinear",
                             align_corners=self.align_corners)

    def forward(self, inputs):
        inputs = self._transform_inputs(inputs)
        size = inputs[0].shape[2:]
        outs = [F.interpolate(conv(x), size=size, mode="bilinear", align_corners=self.align_corners)
                for conv, x in zip(self.convs, inputs)]           # concat in stage order
        return self.cls_seg(self.fusion_conv(torch.cat(outs, dim=1)))


class EncoderDecoder(nn.Module):
    def __init__(self, **backbone):
        super().__init__()
        self.backbone = MixVisionTransformer(**backbone)
        self.decode_head = SegformerHead()

    def forward(self, x):
        return self.decode_head(self.backbone(x))


# ----------------------------------------------------------------------------- checks
def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def grad_err(name, got, ref, all_ref):
    """Error relative to the gradient's scale. Biases whose gradient is zero in theory (the key
    bias, the last stage norm's bias that reaches the loss only through batch-statistics BN)
    carry rounding noise only, so a bias is measured against max(own, its weight's) scale."""
    scale = ref.abs().max()
    weight = name[: -len("bias")] + "weight"
    if name.endswith("bias") and weight in all_ref:
        scale = torch.maximum(scale, all_ref[weight].abs().max())
    return ((got - ref).abs().max() / scale.clamp_min(1e-12)).item()


def model_and_input(**kw):
    torch.manual_seed(0)
    model = init_realistic_(EncoderDecoder(**kw), seed=5)
    # 67x61: stage 1 is 17x16 with 2x2 keys (a single key would make dq zero in theory)
    return model, torch.randn(2, 3, 67, 61, generator=torch.Generator().manual_seed(1))


def check_model(model, x, backend="auto"):
    """Patch ``model`` and compare with an unpatched copy: keys, values, idempotence, eval output,
    training gradients (same RNG draws), unpatch. Returns (report, eval err, worst grad err)."""
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = segformer_fast.patch(model, backend=backend)
    assert report.ecosystem == "mmseg"
    n_blocks = sum(len(stage[1]) for stage in ref.backbone.layers)
    assert len(report.replaced) == 4 + 2 * n_blocks + 1, str(report)
    assert report.skipped == [], str(report)
    assert list(model.state_dict()) == keys
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    for stage in model.backbone.layers:
        assert isinstance(stage[0], FusedOverlapPatchEmbed)
        for block in stage[1]:
            assert isinstance(block.attn, FusedEfficientAttention) and isinstance(block.ffn, FusedMixFFN)
    assert isinstance(model.decode_head, FusedDecodeHead)
    assert segformer_fast.patch(model, backend=backend).replaced == []
    assert list(model.state_dict()) == keys

    model.eval(), ref.eval()
    with torch.no_grad():
        a, b = model(x), ref(x)
    eval_err = rel_err(a, b)
    assert eval_err <= 1e-4, eval_err

    model.train(), ref.train()
    grads = []
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(123)                       # same DropPath / dropout draws
        out = m(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert list(grads[0]) == list(grads[1])
    worst = 0.0
    for name, g in grads[1].items():
        assert grads[0][name] is not None, f"no gradient reached {name}"
        err = grad_err(name, grads[0][name], g, grads[1])
        assert err <= 1e-3, f"{name}: {err:.2e}"
        worst = max(worst, err)

    assert segformer_fast.unpatch(model) == len(report.replaced)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    return report, eval_err, worst


def test_patch_mmseg_backbone():
    model, x = model_and_input()
    _, eval_err, worst = check_model(model, x)
    print(f"mmseg no dropout: eval rel err {eval_err:.2e}, worst grad err {worst:.2e}")


def test_patch_mmseg_dropouts_and_drop_path():
    # every random draw (attention dropout inside nn.MultiheadAttention, proj_drop, ffn dropout,
    # DropPath) must come from the global RNG in the original's order for gradients to match
    model, x = model_and_input(drop=0.1, attn_drop=0.1, drop_path=0.2)
    _, eval_err, worst = check_model(model, x)
    print(f"mmseg with dropouts: eval rel err {eval_err:.2e}, worst grad err {worst:.2e}")


def test_mmseg_recognition():
    from segformer_fast.models import segformer
    adapter = importlib.import_module("segformer_fast.patch.mmseg")
    model, _ = model_and_input()
    assert adapter.matches(model) and adapter.matches(model.backbone)
    assert not adapter.matches(segformer("b0", 2))
    assert segformer_fast.patch(segformer("b0", 2)).ecosystem == "nvlabs"


def test_mmseg_refusals_are_reported():
    model, _ = model_and_input()
    model.backbone.layers[1][0].adap_padding = nn.ZeroPad2d(1)       # stands in for "corner" padding
    model.backbone.layers[2][1][0].ffn.layers[2] = nn.ReLU()
    report = segformer_fast.patch(model)
    skipped = dict(report.skipped)
    assert "adaptive padding" in skipped["backbone.layers.1.0"]
    assert "activation" in skipped["backbone.layers.2.1.0.ffn"]
    assert "backbone.layers.1.0" not in report.replaced
    assert "backbone.layers.2.1.0.ffn" not in report.replaced


def test_mmseg_attention_refuses_inner_batch_first():
    m = EfficientMultiheadAttention(32, 2, sr_ratio=2)
    m.attn = nn.MultiheadAttention(32, 2, batch_first=True)
    with pytest.raises(ValueError, match="batch_first"):
        FusedEfficientAttention.from_module(m)


# ----------------------------------------------------------------------------- per module
def _attention(sr, heads=2, c=64, attn_drop=0.0):
    torch.manual_seed(0)
    m = EfficientMultiheadAttention(c, heads, attn_drop=attn_drop, proj_drop=0.1, drop_path=0.2, sr_ratio=sr)
    return init_realistic_(m, seed=7)


def _compare(orig, fused, x, hw, with_identity):
    """Outputs in eval and train (same seed), and every input/parameter gradient in train."""
    identity = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)) if with_identity else None
    orig.eval(), fused.eval()
    with torch.no_grad():
        a, b = fused(x, hw, identity=identity), orig(x, hw, identity=identity)
    assert rel_err(a, b) <= 1e-5, rel_err(a, b)
    orig.train(), fused.train()
    res = []
    for m in (fused, orig):
        xi = x.clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        torch.manual_seed(321)
        out = m(xi, hw) if identity is None else m(xi, hw, identity)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        res.append((out.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (oa, ga, pa), (ob, gb, pb) = res
    # DropPath must keep at least one sample, else only the residual is compared
    branch = ob - (x if identity is None else identity)
    assert (branch.flatten(1).abs().amax(1) > 0).any()
    assert rel_err(oa, ob) <= 1e-5, rel_err(oa, ob)
    assert rel_err(ga, gb) <= 1e-4, rel_err(ga, gb)
    assert sorted(pa) == sorted(pb)
    for n in pb:
        assert grad_err(n, pa[n], pb[n], pb) <= 1e-4, n


@pytest.mark.parametrize("sr", [8, 1])
@pytest.mark.parametrize("with_identity", [False, True])
def test_mmseg_attention_torch(sr, with_identity):
    orig = _attention(sr)
    fused = FusedEfficientAttention.from_module(copy.deepcopy(orig), backend="torch")
    fused.load_state_dict(orig.state_dict())
    # Q and packed K/V are views of in_proj_weight: zero copies
    w = fused.attn.in_proj_weight
    assert fused._q_weight()[0].data_ptr() == w.data_ptr()
    assert fused._kv_weight()[0].data_ptr() == w[64:].data_ptr() and fused._kv_weight()[0].shape == (128, 64)
    hw = (16, 24)
    x = torch.randn(3, 16 * 24, 64, generator=torch.Generator().manual_seed(3)) * 3
    _compare(orig, fused, x, hw, with_identity)


def test_mmseg_attention_dropout_explicit_path():
    orig = _attention(4, attn_drop=0.2)
    fused = FusedEfficientAttention.from_module(copy.deepcopy(orig), backend="torch")
    fused.load_state_dict(orig.state_dict())
    x = torch.randn(3, 16 * 12, 64, generator=torch.Generator().manual_seed(4))
    _compare(orig, fused, x, (16, 12), False)


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh")])
def test_mmseg_ffn_torch(act):
    torch.manual_seed(0)
    orig = init_realistic_(MixFFN(32, 128, ffn_drop=0.1, drop_path=0.2, act=act), seed=8)
    fused = FusedMixFFN.from_module(copy.deepcopy(orig), backend="torch")
    fused.load_state_dict(orig.state_dict())
    assert list(fused.state_dict()) == list(orig.state_dict())
    assert fused.approximate == act.approximate
    x = torch.randn(3, 13 * 11, 32, generator=torch.Generator().manual_seed(5)) * 2
    _compare(orig, fused, x, (13, 11), True)


def test_mmseg_ffn_refuses_other_activation_and_order():
    m = MixFFN(32, 64, act=nn.SiLU())
    with pytest.raises(ValueError, match="activation"):
        FusedMixFFN.from_module(m)
    m = MixFFN(32, 64)
    m.layers.append(nn.Identity())                 # a part the fused module would not run
    with pytest.raises(ValueError, match="exactly"):
        FusedMixFFN.from_module(m)


def test_mmseg_patch_embed_layout():
    torch.manual_seed(0)
    orig = init_realistic_(PatchEmbed(3, 32, 7, 4, 3), seed=6).eval()
    fused = FusedOverlapPatchEmbed.from_module(orig, backend="torch")
    x = torch.randn(2, 3, 67, 61)
    (a, hwa), (b, hwb) = fused(x), orig(x)
    assert hwa == hwb == (17, 16)
    assert rel_err(a, b) <= 1e-5


def test_mmseg_modules_triton_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter")
    orig = _attention(2, heads=2, c=32)
    fused = FusedEfficientAttention.from_module(copy.deepcopy(orig), backend="triton")
    fused.load_state_dict(orig.state_dict())
    x = torch.randn(2, 6 * 5, 32, generator=torch.Generator().manual_seed(3))
    _compare(orig, fused, x, (6, 5), True)
    torch.manual_seed(0)
    orig = init_realistic_(MixFFN(16, 64, ffn_drop=0.1, drop_path=0.2), seed=8)
    fused = FusedMixFFN.from_module(copy.deepcopy(orig), backend="triton")
    fused.load_state_dict(orig.state_dict())
    _compare(orig, fused, torch.randn(2, 5 * 7, 16, generator=torch.Generator().manual_seed(5)), (5, 7), False)


def test_patch_mmseg_triton_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter")
    model, x = model_and_input(drop=0.1, drop_path=0.2)
    check_model(model, x, backend="triton")


# ----------------------------------------------------------------------------- decode head
HEAD_DIMS, HEAD_D = (32, 64, 160, 256), 64
HEAD_HWS = [(25, 33), (13, 17), (7, 9), (4, 5)]


def _head(dims=HEAD_DIMS, D=HEAD_D, classes=19):
    torch.manual_seed(0)
    return init_realistic_(SegformerHead(dims, D, classes), seed=11)   # random BN running stats


def _head_features(dims=HEAD_DIMS, hws=HEAD_HWS, B=2):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(B, c, h, w, generator=g) for c, (h, w) in zip(dims, hws)]


def _check_head(head, feats, backend):
    """Eval logits, then one training step on two copies with the same seed (same Dropout2d
    mask): every gradient, the running statistics of all 5 BNs and num_batches_tracked."""
    head = head.eval()
    fused = FusedDecodeHead.from_module(head, backend=backend)
    assert list(fused.state_dict()) == list(head.state_dict())
    assert all(p is q for p, q in zip(fused.parameters(), head.parameters()))
    with torch.no_grad():
        eval_err = rel_err(fused(feats), head(feats))
    assert eval_err <= 1e-4, eval_err

    a = copy.deepcopy(head).train()
    b = FusedDecodeHead.from_module(copy.deepcopy(head).train(), backend=backend)
    outs = []
    for m in (b, a):
        torch.manual_seed(7)
        out = m(feats)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outs.append(out.detach())
    assert rel_err(*outs) <= 1e-4
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    worst = 0.0
    for name, p in pa.items():
        err = grad_err(name, pb[name].grad, p.grad, {n: q.grad for n, q in pa.items()})
        assert err <= 1e-3, (name, err)
        worst = max(worst, err)
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert len([n for n in ba if n.endswith("running_mean")]) == 5
    for name, t in ba.items():
        if t.is_floating_point():
            assert (bb[name] - t).abs().max() <= 1e-5 * t.abs().max(), name
        else:
            assert torch.equal(bb[name], t) and t.item() == 1, name
    return eval_err, worst


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_mmseg_head_eval_and_training(backend):
    eval_err, worst = _check_head(_head(), _head_features(), None if backend == "auto" else backend)
    print(f"\nmmseg head ({backend}): eval rel err {eval_err:.2e}, worst grad err {worst:.2e}")


def test_mmseg_head_keeps_the_heads_methods_and_cache():
    head = _head().eval()
    fused = FusedDecodeHead.from_module(head, backend="torch")
    feats = _head_features()
    with torch.no_grad():
        # mmseg's EncoderDecoder calls decode_head.predict: it must run the fused forward
        torch.testing.assert_close(fused.predict(feats, (97, 131)), head.predict(feats, (97, 131)))
        assert fused.num_classes == 19 and fused.in_index == [0, 1, 2, 3]
        key = fused._cache_key
        head.fusion_conv.conv.weight.mul_(1.5)             # an optimizer step: version bump
        head.fusion_conv.bn.running_var.add_(0.25)
        torch.testing.assert_close(fused(feats), head(feats), rtol=1e-4, atol=1e-4)
        assert fused._cache_key != key
    with pytest.raises(AttributeError):
        fused.no_such_method
    head.align_corners = True
    with pytest.raises(TypeError, match="align_corners"):
        FusedDecodeHead.from_module(head)


def test_mmseg_head_flops_drop():
    from torch.utils.flop_counter import FlopCounterMode

    dims, D = (32, 64, 160, 256), 256
    head = _head(dims, D, 150).eval()
    fused = FusedDecodeHead.from_module(head, backend="torch")
    feats = _head_features(dims, [(128, 128), (64, 64), (32, 32), (16, 16)], B=1)
    flops = []
    for m in (head, fused):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(feats)
        flops.append(fc.get_total_flops())
    print(f"\nmmseg head GFLOPs at 512x512: original {flops[0] / 1e9:.2f}, fused {flops[1] / 1e9:.2f}")
    assert flops[1] < 0.5 * flops[0]


def test_mmseg_head_triton_interpreter(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter")
    K = pytest.importorskip("segformer_fast.kernels.triton.upsample_sum")
    calls = []
    fwd = K.upsample_sum_fwd
    monkeypatch.setattr(K, "upsample_sum_fwd", lambda *a, **k: calls.append(1) or fwd(*a, **k))
    dims = (8, 12, 16, 20)
    _check_head(_head(dims, 16, 5), _head_features(dims, [(6, 7), (3, 4), (2, 2), (1, 1)], B=2), "triton")
    assert len(calls) == 2              # the eval forward and the training forward ran the kernel
