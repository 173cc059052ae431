"""``segformer_fast.patch`` on one part at a time (attention, Mix-FFN, patch embedding) of every
codebase layout: the patched instance against a stock copy, forward and every gradient, and
proof that the fused op ran (not the stock forward)."""
import copy

import pytest
import torch
import torch.nn as nn

import segformer_fast
from segformer_fast.testing import init_realistic_

from legacy_hf import run_legacy
from seed_model import load_seed_module


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused ops the patched forwards call (where the fused path really ran)."""
    import segformer_fast.nn.attention as A
    import segformer_fast.nn.decode_head as D
    import segformer_fast.nn.mix_ffn as M
    import segformer_fast.nn.patch_embed as P
    counts = {}
    for mod, name in ((A, "sra_attention"), (P, "conv_layernorm"), (M, "dwconv_gelu"), (D, "upsample_sum")):
        real = getattr(mod, name)

        def counted(*a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, counted)
    return counts


def check_part(part, call, x, backend="torch", tol=1e-4):
    """Patch ``part`` in place and compare it with a stock copy: output and the gradients of the
    input and of every parameter, each within ``tol`` of its scale (a gradient that is ~0 in
    theory, the key bias's, is measured against the largest gradient)."""
    stock = copy.deepcopy(part)
    keys = list(part.state_dict())
    report = segformer_fast.patch(part, backend=backend)
    assert report.replaced == [type(part).__name__] and not report.skipped, str(report)
    assert type(part) is type(stock) and list(part.state_dict()) == keys
    results = []
    for m in (stock, part):
        xi = x.detach().clone().requires_grad_()
        out = call(m, xi)
        params = [p for p in m.parameters()]
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum(),
                                    [xi] + params)
        results.append((out.detach(), grads))
    (a, ga), (b, gb) = results
    assert (a - b).abs().max() <= tol * a.abs().max(), ((a - b).abs().max(), a.abs().max())
    gscale = max(g.abs().max() for g in ga)
    for u, w in zip(ga, gb):
        assert (u - w).abs().max() <= tol * max(u.abs().max(), 1e-2 * gscale), ((u - w).abs().max(), u.abs().max())
    return part


# ----------------------------------------------------------------------------- factories
def ours_attention(C=64, heads=2, sr=4, **kw):
    from segformer_fast.models.segformer import Attention
    return init_realistic_(Attention(C, heads, sr, **kw), seed=3)


def hf_attention(C=64, heads=2, sr=4):
    from transformers import SegformerConfig
    from transformers.models.segformer.modeling_segformer import SegformerAttention
    m = SegformerAttention(SegformerConfig(attn_implementation="eager"), C, heads, sr)
    return init_realistic_(m, seed=4)


def ours_mix_ffn(approximate="none"):
    from segformer_fast.models.segformer import MixFFN
    return init_realistic_(MixFFN(24, 96, approximate=approximate), seed=2)


def hf_mix_ffn(act):
    from transformers import SegformerConfig
    from transformers.models.segformer.modeling_segformer import SegformerMixMLP
    return init_realistic_(SegformerMixMLP(SegformerConfig(hidden_act=act), 24, 96), seed=2)


def seed_module():
    mod = load_seed_module()
    if mod is None:
        pytest.skip("seed document not found (../shared/seed)")
    return mod


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_nvlabs(backend, fused_calls):
    H, W = (12, 9) if backend == "torch" else (6, 5)
    check_part(ours_attention(), lambda m, x: m(x, H, W), torch.randn(2, H * W, 64), backend)
    assert fused_calls == {"sra_attention": 1, "conv_layernorm": 1}


def test_attention_nvlabs_no_reduction_and_seed_names(fused_calls):
    check_part(ours_attention(32, 1, 1), lambda m, x: m(x, 5, 7), torch.randn(2, 35, 32))
    seed = init_realistic_(seed_module().Attention(64, 2, 2), seed=5)       # `head`, no dropouts
    check_part(seed, lambda m, x: m(x, 6, 4), torch.randn(1, 24, 64))
    assert fused_calls["sra_attention"] == 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_hf(backend, fused_calls):
    H, W = (12, 9) if backend == "torch" else (6, 5)
    part = hf_attention()
    out = check_part(part, lambda m, x: m(x, H, W)[0], torch.randn(2, H * W, 64), backend)(
        torch.randn(1, H * W, 64), H, W)
    assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
    assert fused_calls["sra_attention"] >= 1


def test_attention_dropout_on_probabilities_runs_stock_forward(fused_calls):
    """p > 0 on the probabilities in training cannot be fused (the kernel never forms them): the
    stock forward runs, with the same RNG stream, hence the same numbers."""
    part = ours_attention(attn_drop=0.3, proj_drop=0.2).train()
    stock = copy.deepcopy(part)
    segformer_fast.patch(part, backend="torch")
    x = torch.randn(2, 64, 64)
    torch.manual_seed(7)
    a = stock(x, 8, 8)
    torch.manual_seed(7)
    torch.testing.assert_close(part(x, 8, 8), a, rtol=0, atol=0)
    assert fused_calls == {}
    part.eval(), stock.eval()
    torch.testing.assert_close(part(x, 8, 8), stock(x, 8, 8), rtol=1e-5, atol=1e-5)
    assert fused_calls["sra_attention"] == 1


# ----------------------------------------------------------------------------- Mix-FFN
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mix_ffn_ours(approximate, fused_calls):
    check_part(ours_mix_ffn(approximate), lambda m, x: m(x, 5, 7), torch.randn(2, 35, 24))
    assert fused_calls == {"dwconv_gelu": 1}


def test_mix_ffn_ours_triton(fused_calls):
    check_part(ours_mix_ffn(), lambda m, x: m(x, 3, 4), torch.randn(1, 12, 24), "triton")
    assert fused_calls == {"dwconv_gelu": 1}


def test_mix_ffn_seed(fused_calls):
    check_part(init_realistic_(seed_module().MLP(24, 96), seed=2), lambda m, x: m(x, 5, 7),
               torch.randn(2, 35, 24))
    assert fused_calls == {"dwconv_gelu": 1}


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_mix_ffn_hf(act, fused_calls):
    check_part(hf_mix_ffn(act), lambda m, x: m(x, 5, 7), torch.randn(2, 35, 24))
    assert fused_calls == {"dwconv_gelu": 1}


@pytest.mark.parametrize("act", ["relu", "quick_gelu"])
def test_mix_ffn_other_activation_is_refused(act):
    part = hf_mix_ffn(act)
    report = segformer_fast.patch(part)
    assert report.replaced == [] and "activation" in report.skipped[0][1], str(report)
    assert "forward" not in vars(part)


# ----------------------------------------------------------------------------- patch embedding
def _patch_embeds():
    from transformers.models.segformer.modeling_segformer import SegformerOverlapPatchEmbeddings
    from segformer_fast.models.segformer import OverlapPatchEmbed
    return [("ours_k7", lambda: OverlapPatchEmbed(3, 32, 7, 4), 3),
            ("ours_k3_eps1e-6", lambda: OverlapPatchEmbed(16, 24, 3, 2, eps=1e-6), 16),
            ("hf", lambda: SegformerOverlapPatchEmbeddings(3, 4, 3, 32), 3)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", range(3), ids=["ours_k7", "ours_k3_eps1e-6", "hf"])
def test_patch_embed(case, backend, fused_calls):
    name, make, cin = _patch_embeds()[case]
    part = init_realistic_(make(), seed=1)
    ref_hw = part(torch.randn(1, cin, 29, 22))[1:]
    check_part(part, lambda m, x: m(x)[0], torch.randn(2, cin, 29, 22), backend)
    assert part(torch.randn(1, cin, 29, 22))[1:] == ref_hw          # the same (H, W) convention
    assert fused_calls == {"conv_layernorm": 2}


def test_patch_embed_unsupported_conv_is_refused():
    from segformer_fast.models.segformer import OverlapPatchEmbed
    part = OverlapPatchEmbed(3, 8, 3, 2)
    part.proj = nn.Conv2d(3, 8, 3, 2, 1, dilation=2)
    report = segformer_fast.patch(part)
    assert report.replaced == [] and "dilation" in report.skipped[0][1], str(report)


def test_patch_rejects_what_it_does_not_know():
    with pytest.raises(TypeError, match="SegFormer"):
        segformer_fast.patch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        segformer_fast.patch("model")


# ----------------------------------------------------------------------------- HF <= 5.8
LEGACY = r"""
import torch, transformers, segformer_fast
from transformers import SegformerConfig
from transformers.models.segformer import modeling_segformer as hf
from segformer_fast.testing import init_realistic_
from test_parts import check_part
assert int(transformers.__version__.split('.')[0]) < 5, transformers.__version__
att = init_realistic_(hf.SegformerAttention(SegformerConfig(), 64, 2, 4), seed=6)
assert hasattr(att, 'self') and hasattr(att, 'output')
stock = __import__('copy').deepcopy(att)
check_part(att, lambda m, x: m(x, 12, 9)[0], torch.randn(2, 108, 64))
x = torch.randn(2, 108, 64)
assert len(att(x, 12, 9)) == 1
o, r = att(x, 12, 9, output_attentions=True), stock(x, 12, 9, output_attentions=True)
assert len(o) == 2 and o[1].shape == r[1].shape == (2, 2, 108, 6), (o[1].shape, r[1].shape)
torch.testing.assert_close(o[1], r[1]); torch.testing.assert_close(o[0], r[0])
for act in ("gelu", "gelu_new"):
    m = init_realistic_(hf.SegformerMixFFN(SegformerConfig(hidden_act=act), 24, 96), seed=1)
    check_part(m, lambda m, x: m(x, 5, 7), torch.randn(2, 35, 24))
pe = init_realistic_(hf.SegformerOverlapPatchEmbeddings(3, 4, 3, 32), seed=2)
check_part(pe, lambda m, x: m(x)[0], torch.randn(2, 3, 29, 22))
print('legacy', transformers.__version__, 'ok')
"""


def test_hf_legacy_parts():
    run_legacy(LEGACY)
