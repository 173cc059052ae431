"""segformer_fast.patch on mmsegmentation 1.x's own SegFormer source.

mmseg 1.2.2's ``mmseg/models/backbones/mit.py`` and ``decode_heads/segformer_head.py`` (with the
real ``mmcv.cnn.bricks`` and ``mmengine`` they build from) are loaded by ``tests/mmseg_source.py``
from a directory named by ``SEGFORMER_FAST_MMSEG`` (CI installs it; locally these tests skip
when it is unset, in CI they fail). Models are built at tiny sizes (embed dims 16/32/32/32,
depth 1, 64x48 inputs), patched in place and compared with an unpatched deep copy.
"""
import copy
import os

import pytest
import torch
import torch.nn as nn

import segformer_fast
from segformer_fast.testing import init_realistic_


@pytest.fixture(scope="module")
def mm():
    from mmseg_source import loaded

    with loaded() as ns:
        yield ns


# ----------------------------------------------------------------------------- builders
DIMS = (16, 32, 32, 32)


def backbone(mm, drop=0.0, attn_drop=0.0, drop_path=0.0):
    return mm.mit.MixVisionTransformer(
        in_channels=3, embed_dims=16, num_stages=4, num_layers=[1, 1, 1, 1], num_heads=[1, 2, 2, 2],
        patch_sizes=[7, 3, 3, 3], sr_ratios=[8, 4, 2, 1], out_indices=(0, 1, 2, 3), mlp_ratio=4,
        qkv_bias=True, drop_rate=drop, attn_drop_rate=attn_drop, drop_path_rate=drop_path)


def head(mm, in_channels=DIMS, channels=32, classes=5, dropout=0.1):
    return mm.segformer_head.SegformerHead(
        in_channels=list(in_channels), in_index=list(range(len(in_channels))), channels=channels,
        dropout_ratio=dropout, num_classes=classes, norm_cfg=dict(type="BN", requires_grad=True),
        align_corners=False)


class Segmentor(nn.Module):
    """mmseg's EncoderDecoder's tensor path: backbone -> decode_head (its ``_forward``)."""

    def __init__(self, backbone, decode_head):
        super().__init__()
        self.backbone, self.decode_head = backbone, decode_head

    def forward(self, x):
        return self.decode_head(self.backbone(x))


def segmentor(mm, seed=5, **drops):
    torch.manual_seed(0)
    return init_realistic_(Segmentor(backbone(mm, **drops), head(mm)), seed=seed)


# ----------------------------------------------------------------------------- checks
def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def grad_pieces(name, got, ref, all_ref):
    """(patched, reference, scale) pieces of one gradient, each relative to its scale. A bias
    whose gradient is zero in theory carries rounding noise only: the key third of
    ``in_proj_bias`` (softmax ignores a per-row constant), biases feeding a batch-statistics BN,
    the last stage norm's bias. So a bias is measured against the larger of its own and its
    weight's gradient scale, the key bias against the key rows of ``in_proj_weight``."""
    weight = name[: -len("bias")] + "weight"
    if not (name.endswith("bias") and weight in all_ref):
        yield got, ref, ref.abs().max()
        return
    w = all_ref[weight]
    if name.endswith("in_proj_bias"):
        C = ref.numel() // 3
        for s in (slice(0, C), slice(C, 2 * C), slice(2 * C, 3 * C)):
            yield got[s], ref[s], torch.maximum(ref[s].abs().max(), w[s].abs().max())
        return
    yield got, ref, torch.maximum(ref.abs().max(), w.abs().max())


def train_step(models, x, seed, args=()):
    """One forward/backward per model with the same RNG seed (same dropout / DropPath draws);
    returns [(output, {param: grad}, input grad or None)]."""
    res = []
    for m in models:
        m.train()
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(x.is_floating_point())
        torch.manual_seed(seed)
        out = m(xi, *args)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        res.append((out.detach(), {n: p.grad for n, p in m.named_parameters()}, xi.grad))
    return res


def assert_grads_match(got, ref, tol):
    assert list(got) == list(ref)
    worst = 0.0
    for name, g in ref.items():
        assert got[name] is not None, f"no gradient reached {name}"
        for part, ref_part, scale in grad_pieces(name, got[name], g, ref):
            err = ((part - ref_part).abs().max() / scale.clamp_min(1e-12)).item()
            assert err <= tol, f"{name}: {err:.2e}"
            worst = max(worst, err)
    return worst


def patch_and_check(model, backend="torch"):
    """Patch ``model`` in place: classes, state_dict, instance forwards, idempotence. Returns
    (report, unpatched deep copy taken before patching)."""
    ref = copy.deepcopy(model)
    types = [type(m) for m in model.modules()]
    sd = model.state_dict()
    report = segformer_fast.patch(model, backend=backend)
    assert report.ecosystem == "mmseg", str(report)
    assert [type(m) for m in model.modules()] == types           # every instance keeps its class
    modules = dict(model.named_modules())
    for path in report.replaced:
        m = modules[path if path in modules else ""]
        assert "forward" in vars(m), path                           # bound on the instance
    assert list(model.state_dict()) == list(sd)
    for k, v in model.state_dict().items():
        assert v is sd[k] or torch.equal(v, sd[k]), k
    assert segformer_fast.patch(model, backend=backend).replaced == []
    return report, ref


# ----------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("shape", [(2, 3, 64, 48), (1, 3, 67, 61)])
def test_real_mmseg_segformer_patched_matches(mm, shape):
    # dropout after the projections and in the FFN, DropPath: the fused paths run in training
    # (batch 1: the FFN dropout masks follow the source's NCHW memory order, see _ffn_dropout)
    model = segmentor(mm, drop=0.1, drop_path=0.2)
    hooked = []
    model.backbone.layers[0][1][0].attn.register_forward_hook(lambda m, a, o: hooked.append(o.shape))
    report, ref = patch_and_check(model)
    print("\n" + str(report))
    patched = set(report.replaced)
    for i in range(4):
        assert f"backbone.layers.{i}.0" in patched
        assert f"backbone.layers.{i}.1.0.attn" in patched
        assert f"backbone.layers.{i}.1.0.ffn" in patched
    assert "decode_head" in patched
    assert not report.skipped, str(report)

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    model.eval(), ref.eval()
    with torch.no_grad():
        a, b = model(x), ref(x)
    assert a.shape == b.shape and rel_err(a, b) <= 1e-4, rel_err(a, b)
    assert len(hooked) == 2                  # the user's hook fired on the patched attention too

    (oa, ga, _), (ob, gb, _) = train_step([model, ref], x, seed=123)
    assert rel_err(oa, ob) <= 1e-4, rel_err(oa, ob)
    worst = assert_grads_match(ga, gb, 1e-3)
    buffers = dict(ref.named_buffers())
    assert sum(n.endswith("running_mean") for n in buffers) == 5
    for n, t in model.named_buffers():
        if t.is_floating_point():
            assert (t - buffers[n]).abs().max() <= 1e-5 * buffers[n].abs().max(), n
        else:
            assert torch.equal(t, buffers[n]), n
    print(f"real mmseg {shape}: eval rel err {rel_err(a, b):.2e}, worst grad err {worst:.2e}")

    assert segformer_fast.unpatch(model) == len(report.replaced)
    assert not any("forward" in vars(m) for m in model.modules())
    model.eval(), ref.eval()
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) <= 1e-5        # stock forwards again (BN stats: rounding)


def test_real_mmseg_attention_dropout_runs_the_stock_forward(mm):
    # dropout on attention probabilities cannot be fused: training falls back to the stock
    # forward (same draws), eval stays fused
    model = segmentor(mm, attn_drop=0.2, drop_path=0.1)
    report, ref = patch_and_check(model)
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    model.eval(), ref.eval()
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) <= 1e-4
    (oa, ga, _), (ob, gb, _) = train_step([model, ref], x, seed=9)
    assert rel_err(oa, ob) <= 1e-4
    assert_grads_match(ga, gb, 1e-3)


def test_real_mmseg_recognition(mm):
    from segformer_fast.models import segformer
    from segformer_fast.patch import mmseg as adapter

    model = segmentor(mm)
    assert adapter.matches(model) and adapter.matches(model.backbone)
    assert adapter.matches(model.decode_head)
    assert not adapter.matches(segformer("b0", 2))
    assert segformer_fast.patch(segformer("b0", 2)).ecosystem == "nvlabs"


# ----------------------------------------------------------------------------- bare parts
def _tokens(B, hw, C, seed, scale=2.0):
    return torch.randn(B, hw[0] * hw[1], C, generator=torch.Generator().manual_seed(seed)) * scale


def _check_part(part, x, args, backend="torch", tol=1e-5):
    """Patch a bare part; forward parity in eval, forward/input/parameter gradients in train."""
    cls = type(part)
    report, ref = patch_and_check(part, backend=backend)
    assert report.replaced == [cls.__name__] and not report.skipped, str(report)
    assert type(part) is cls and "forward" in vars(part)
    part.eval(), ref.eval()
    with torch.no_grad():
        a, b = part(x, *args), ref(x, *args)
    assert rel_err(a, b) <= tol, rel_err(a, b)
    (oa, ga, xa), (ob, gb, xb) = train_step([part, ref], x, seed=321, args=args)
    assert rel_err(oa, ob) <= tol, rel_err(oa, ob)
    assert rel_err(xa, xb) <= 10 * tol, rel_err(xa, xb)
    assert_grads_match(ga, gb, 10 * tol)
    return oa, ob


@pytest.mark.parametrize("sr", [4, 1])
@pytest.mark.parametrize("with_identity", [False, True])
def test_real_mmseg_attention_part(mm, sr, with_identity):
    torch.manual_seed(0)
    attn = init_realistic_(mm.mit.EfficientMultiheadAttention(
        32, 2, proj_drop=0.1, dropout_layer=dict(type="DropPath", drop_prob=0.3), sr_ratio=sr),
        seed=7)
    hw = (12, 9)
    x = _tokens(3, hw, 32, 3)
    identity = _tokens(3, hw, 32, 4) if with_identity else None
    out, ref_out = _check_part(attn, x, (hw, identity))
    base = x if identity is None else identity
    # DropPath kept at least one sample's branch, so the fused branch was really compared
    assert ((ref_out - base).flatten(1).abs().amax(1) > 0).any()


@pytest.mark.parametrize("act", ["GELU", "tanh"])
def test_real_mmseg_mix_ffn_part(mm, act):
    torch.manual_seed(0)
    act_cfg = dict(type="GELU") if act == "GELU" else dict(type="GELU", approximate="tanh")
    ffn = init_realistic_(mm.mit.MixFFN(16, 64, act_cfg=act_cfg, ffn_drop=0.1,
                                        dropout_layer=dict(type="DropPath", drop_prob=0.2)), seed=8)
    hw = (11, 7)
    _check_part(ffn, _tokens(2, hw, 16, 5), (hw, _tokens(2, hw, 16, 6)))


@pytest.mark.parametrize("B", [1, 2])
def test_real_mmseg_mix_ffn_fused_draws_the_sources_masks(mm, B):
    # regression: at batch 1 mmseg's convs return NCHW maps, so its dropout masks are drawn in
    # NCHW order; the fused FFN drew them in token (channels-last) order and its training
    # outputs differed from the source's by ~60% of their scale
    torch.manual_seed(0)
    ffn = init_realistic_(mm.mit.MixFFN(16, 64, ffn_drop=0.3), seed=8)
    hw = (9, 7)
    _check_part(ffn, _tokens(B, hw, 16, 5), (hw,))


def test_real_mmseg_patch_embed_part(mm):
    torch.manual_seed(0)
    pe = init_realistic_(mm.embed.PatchEmbed(in_channels=3, embed_dims=16, kernel_size=7, stride=4,
                                             padding=3, norm_cfg=dict(type="LN", eps=1e-6)), seed=6)
    report, ref = patch_and_check(pe)
    assert report.replaced == ["PatchEmbed"]
    x = torch.randn(2, 3, 67, 61)
    with torch.no_grad():
        (a, hwa), (b, hwb) = pe(x), ref(x)
    assert hwa == hwb == (17, 16)
    assert rel_err(a, b) <= 1e-5


def test_real_mmseg_refusals_are_reported(mm):
    # adaptive ("corner") padding: the adapter leaves the patch embedding to its stock forward
    pe = mm.embed.PatchEmbed(in_channels=3, embed_dims=16, kernel_size=7, stride=4,
                             padding="corner", norm_cfg=dict(type="LN", eps=1e-6))
    assert pe.adap_padding is not None
    report = segformer_fast.patch(pe, backend="torch")
    assert report.replaced == [] and len(report.skipped) == 1
    assert "adap_padding" in report.skipped[0][1]
    assert "forward" not in vars(pe)
    # in a whole model, that patch embedding is skipped with its reason, the rest still patched
    model = segmentor(mm)
    model.backbone.layers[1][0] = pe
    report = segformer_fast.patch(model, backend="torch")
    assert "adap_padding" in dict(report.skipped)["backbone.layers.1.0"]
    assert "backbone.layers.1.0" not in report.replaced
    assert "backbone.layers.1.1.0.attn" in report.replaced
    # an inner nn.MultiheadAttention that is batch_first would attend over the batch axis
    attn = mm.mit.EfficientMultiheadAttention(32, 2, sr_ratio=2)
    attn.attn = nn.MultiheadAttention(32, 2, batch_first=True)
    report = segformer_fast.patch(attn, backend="torch")
    assert report.replaced == [] and "batch_first" in report.skipped[0][1]


# mit.py builds sr, fc1, pe_conv and fc2 with mmcv's Conv2d wrapper (exactly nn.Conv2d's forward
# on torch >= 1.5): the mmseg adapter vouches for it, so every conv of the real model is fused
def test_real_mmseg_every_conv_is_fused(mm, monkeypatch):
    import segformer_fast.nn.mix_ffn as mix_ffn
    import segformer_fast.nn.patch_embed as patch_embed

    calls = {"conv_layernorm": 0, "dwconv_gelu": 0}

    def spy(mod, name):
        fn = getattr(mod, name)

        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        monkeypatch.setattr(mod, name, wrapped)

    spy(patch_embed, "conv_layernorm"), spy(mix_ffn, "dwconv_gelu")
    model = segmentor(mm).eval()
    model.backbone.layers[3][1][0].ffn.layers[2] = nn.ReLU()
    report = segformer_fast.patch(model, backend="torch")
    assert report.skipped == [("backbone.layers.3.1.0.ffn", report.skipped[0][1])]
    assert "activation" in report.skipped[0][1]
    assert len(report.replaced) == 4 + 4 + 3 + 1
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 48))
    # 4 patch embeddings + 3 sequence reductions (sr 8, 4, 2); 3 GELU Mix-FFNs
    assert calls == {"conv_layernorm": 7, "dwconv_gelu": 3}


# ----------------------------------------------------------------------------- decode head
HEAD_HWS = [(16, 12), (8, 6), (4, 3), (2, 2)]


def _head_features(dims=DIMS, hws=HEAD_HWS, B=2):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(B, c, h, w, generator=g) for c, (h, w) in zip(dims, hws)]


def test_real_mmseg_head_part_and_predict(mm):
    torch.manual_seed(0)
    h = init_realistic_(head(mm, classes=7), seed=11)
    report, ref = patch_and_check(h)
    assert report.replaced == ["SegformerHead"]
    feats = _head_features()
    h.eval(), ref.eval()
    metas = [dict(img_shape=(61, 45), pad_shape=(64, 48))]
    with torch.no_grad():
        assert rel_err(h(feats), ref(feats)) <= 1e-4
        # EncoderDecoder calls decode_head.predict: the class method runs the bound forward
        got = h.predict(feats, metas, test_cfg={})
        want = ref.predict(feats, metas, test_cfg={})
        assert got.shape == (2, 7, 64, 48) and rel_err(got, want) <= 1e-4
        h.fusion_conv.conv.weight.mul_(1.5)              # an optimizer step: folded cache refreshed
        ref.fusion_conv.conv.weight.mul_(1.5)
        assert rel_err(h(feats), ref(feats)) <= 1e-4
    (oa, ga, _), (ob, gb, _) = _head_train(h, ref)
    assert rel_err(oa, ob) <= 1e-4
    assert_grads_match(ga, gb, 1e-3)
    for (n, s), t in zip(h.named_buffers(), ref.buffers()):
        assert torch.allclose(s.float(), t.float(), rtol=1e-5, atol=1e-6), n


def _head_train(*heads):
    res = []
    for m in heads:
        m.train()
        torch.manual_seed(7)                 # the same Dropout2d mask
        out = m(_head_features())
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        res.append((out.detach(), {n: p.grad for n, p in m.named_parameters()}, None))
    return res


def test_real_mmseg_head_flops_drop(mm):
    from torch.utils.flop_counter import FlopCounterMode

    dims = (32, 64, 160, 256)
    h = head(mm, dims, 256, 150).eval()
    ref = copy.deepcopy(h)
    segformer_fast.patch(h, backend="torch")
    feats = _head_features(dims, [(128, 128), (64, 64), (32, 32), (16, 16)], B=1)
    flops = []
    for m in (ref, h):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(feats)
        flops.append(fc.get_total_flops())
    print(f"\nmmseg head GFLOPs at 512x512: stock {flops[0] / 1e9:.2f}, patched {flops[1] / 1e9:.2f}")
    assert flops[1] < 0.5 * flops[0]


# ----------------------------------------------------------------------------- Triton
def test_real_mmseg_triton_interpreter(mm):
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter (or a GPU)")
    torch.manual_seed(0)
    attn = init_realistic_(mm.mit.EfficientMultiheadAttention(
        32, 2, proj_drop=0.1, dropout_layer=dict(type="DropPath", drop_prob=0.3), sr_ratio=2), seed=7)
    hw = (6, 5)
    _check_part(attn, _tokens(2, hw, 32, 3), (hw, _tokens(2, hw, 32, 4)), backend="triton", tol=1e-4)
