"""Our reference SegFormer and its converters."""

import pytest
import torch

from segformer_fast.models import VARIANTS, from_hf, from_nvlabs_state_dict, segformer
from segformer_fast.testing import init_realistic_
from legacy_hf import run_legacy

transformers = pytest.importorskip("transformers")


def _hf_b0(num_labels=7, **kw):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    return init_realistic_(SegformerForSemanticSegmentation(SegformerConfig(num_labels=num_labels, **kw)), seed=1)


@pytest.mark.parametrize("variant,params_m", [("b0", 3.75), ("b1", 13.7), ("b2", 27.4)])
def test_variant_sizes(variant, params_m):
    m = segformer(variant, 150)
    n = sum(p.numel() for p in m.parameters()) / 1e6
    assert abs(n - params_m) < 0.1, n
    # NVlabs eps layout
    assert m.backbone.block1[0].norm1.eps == 1e-6 and m.backbone.norm4.eps == 1e-6
    assert m.backbone.patch_embed1.norm.eps == 1e-5 and m.backbone.block1[0].attn.norm.eps == 1e-5


def test_unknown_variant():
    with pytest.raises(ValueError, match="B0"):
        segformer("b9")


def test_forward_shapes_and_upsample():
    m = segformer("b0", 5).eval()
    x = torch.randn(2, 3, 61, 45)
    with torch.no_grad():
        assert m(x).shape == (2, 5, 16, 12)
        m.upsample_logits = True
        assert m(x).shape == (2, 5, 61, 45)


def test_from_hf_current_layout_parity():
    hf = _hf_b0().eval()
    ours = from_hf(hf)
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        a, b = hf(x).logits, ours(x)
    assert a.shape == b.shape == (2, 7, 25, 33)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert not ours.training
    assert ours.backbone.block1[0].norm1.eps == hf.segformer.stages[0].blocks[0].layernorm_before.eps


def test_from_hf_reads_eps_and_training_mode():
    hf = _hf_b0(hidden_act="gelu_new")
    hf.segformer.stages[1].blocks[0].layernorm_before.eps = 1e-6
    ours = from_hf(hf)
    assert ours.training
    assert ours.backbone.block2[0].norm1.eps == 1e-6
    assert ours.backbone.block1[0].mlp.act.approximate == "tanh"


def test_from_hf_rejects_wrong_model():
    with pytest.raises(TypeError, match="SegformerForSemanticSegmentation"):
        from_hf(torch.nn.Linear(2, 2))


LEGACY_SCRIPT = r"""
import torch, transformers
from transformers import SegformerConfig, SegformerForSemanticSegmentation
from segformer_fast.models import from_hf
from segformer_fast.testing import init_realistic_
assert int(transformers.__version__.split('.')[0]) < 5, transformers.__version__
hf = init_realistic_(SegformerForSemanticSegmentation(SegformerConfig(num_labels=7)), seed=1).eval()
assert hasattr(hf.segformer, 'encoder')
ours = from_hf(hf)
x = torch.randn(2, 3, 97, 131)
with torch.no_grad():
    a, b = hf(x).logits, ours(x)
err = ((a - b).abs().max() / a.abs().max()).item()
assert err <= 1e-4, err
print('legacy', transformers.__version__, err)
"""


def test_from_hf_legacy_layout():
    run_legacy(LEGACY_SCRIPT)


def test_nvlabs_state_dict_roundtrip():
    src = init_realistic_(segformer("b0", 19), seed=3).eval()
    sd = {"state_dict": {**src.state_dict(), "decode_head.conv_seg.weight": torch.zeros(19, 256, 1, 1)}}
    m = from_nvlabs_state_dict(sd).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x))
    # backbone-only ImageNet checkpoint
    bb = {k[len("backbone."):]: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    bb["head.weight"] = torch.zeros(1000, 256)
    m2 = from_nvlabs_state_dict(bb, num_classes=4)
    torch.testing.assert_close(m2.backbone.block4[1].mlp.fc2.weight, src.backbone.block4[1].mlp.fc2.weight)
    with pytest.raises(ValueError, match="num_classes"):
        from_nvlabs_state_dict(bb)
    sd_b2 = segformer("b2", 3).state_dict()
    assert len(from_nvlabs_state_dict(sd_b2).backbone.block3) == VARIANTS["b2"][1][2]
