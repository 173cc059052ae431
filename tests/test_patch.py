"""segformer_fast.patch on the models people run: HF (both layouts), the seed's NVlabs-style
model and our own; parity in eval and training, idempotence, state_dict, unpatch."""
import copy
import os

import pytest
import torch

import segformer_fast
from segformer_fast.models import segformer
from segformer_fast.testing import init_realistic_

from seed_model import load_seed_module

transformers = pytest.importorskip("transformers")
from transformers import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402
from legacy_hf import run_legacy

TINY = dict(hidden_sizes=[32, 64, 64, 64], num_attention_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1],
            decoder_hidden_size=32, num_labels=5)


def hf_model(**cfg):
    torch.manual_seed(0)
    m = SegformerForSemanticSegmentation(SegformerConfig(**cfg))
    return init_realistic_(m, seed=2)


def seed_b0():
    mod = load_seed_module()
    if mod is None:
        pytest.skip("seed document not found (../shared/seed)")
    torch.manual_seed(0)
    return init_realistic_(mod.SegFormer("B0", num_classes=19), seed=3)


def logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check_patch(model, x, backend="auto", min_replaced=8, grad_tol=1e-3):
    """Patch a copy of ``model`` and compare it with the original, eval and train."""
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = segformer_fast.patch(model, backend=backend)
    assert len(report.replaced) >= min_replaced, str(report)
    assert not report.skipped, str(report)
    assert list(model.state_dict()) == keys
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    again = segformer_fast.patch(model, backend=backend)
    assert again.replaced == [] and list(model.state_dict()) == keys

    model.eval(), ref.eval()
    assert all(not m.training for m in model.modules())
    with torch.no_grad():
        a, b = logits(model, x), logits(ref, x)
    assert a.shape == b.shape
    assert rel_err(a, b) <= 1e-4, rel_err(a, b)

    model.train(), ref.train()
    assert all(m.training for m in model.modules())
    grads = []
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(123)                       # same DropPath / dropout draws
        out = logits(m, x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert list(grads[0]) == list(grads[1])
    for name, g in grads[1].items():
        got = grads[0][name]
        assert got is not None, f"no gradient reached {name}"
        for part, ref_part, scale in grad_parts(name, got, g, grads[1]):
            err = ((part - ref_part).abs().max() / scale.clamp_min(1e-12)).item()
            assert err <= grad_tol, f"{name}: {err:.2e}"
    return report


def grad_parts(name, got, ref, all_ref):
    """(patched, reference, scale) pieces of one gradient, each compared relative to its scale.

    Some biases have an exactly-zero gradient in theory, so both sides carry rounding noise
    only: the key bias (softmax ignores a per-row constant), biases feeding a batch-statistics
    BatchNorm (the decoder projections: the batch mean removes them) and the last stage's
    LayerNorm bias (it reaches the head only through that path). Verified in fp64 (~1e-13 vs
    ~1e-4 noise in fp32). A bias is therefore measured against the larger of its own and its
    layer's weight-gradient scale; the key half of a packed ``kv`` bias against the key weight's.
    """
    weight = name[: -len("bias")] + "weight"
    if not (name.endswith("bias") and weight in all_ref):
        yield got, ref, ref.abs().max()
        return
    w = all_ref[weight]
    if name.endswith("attn.kv.bias"):
        c = ref.numel() // 2
        yield got[:c], ref[:c], w[:c].abs().max()
        got, ref, w = got[c:], ref[c:], w[c:]
    yield got, ref, torch.maximum(ref.abs().max(), w.abs().max())


@pytest.mark.parametrize("shape", [(2, 3, 97, 131), (2, 3, 61, 45)])
def test_patch_hf_b0(shape):
    report = check_patch(hf_model(num_labels=7), torch.randn(*shape))
    assert report.ecosystem == "huggingface"
    assert any(p.endswith("decode_head") for p in report.replaced)


def test_patch_hf_tiny_custom_config():
    check_patch(hf_model(**TINY, hidden_act="gelu_new"), torch.randn(2, 3, 61, 45), min_replaced=8)


def test_patch_seed_b0():
    report = check_patch(seed_b0(), torch.randn(2, 3, 77, 101))
    assert report.ecosystem == "nvlabs"


def test_patch_our_model_and_unpatch():
    model = init_realistic_(segformer("b0", 6), seed=4).eval()
    ref = copy.deepcopy(model)
    report = segformer_fast.patch(model)
    assert len(report.replaced) == 4 + 8 + 8 + 1
    assert segformer_fast.unpatch(model) == len(report.replaced)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


def test_patch_rejects_non_segformer():
    with pytest.raises(TypeError, match="SegFormer"):
        segformer_fast.patch(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="backend"):
        segformer_fast.patch(segformer("b0", 2), backend="fast")


def test_patch_tiny_hf_triton_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter")
    model = hf_model(**TINY, hidden_act="gelu")
    # 67x61 gives stage 1 a 17x16 map and 2x2 keys: with a single key, dq would be zero in theory.
    check_patch(model, torch.randn(2, 3, 67, 61), backend="triton")


LEGACY = r"""
import torch, transformers
from test_patch import check_patch, hf_model, TINY
assert transformers.__version__.startswith('4.'), transformers.__version__
m = hf_model(num_labels=7)
assert hasattr(m.segformer, 'encoder')
r = check_patch(m, torch.randn(2, 3, 97, 131))
check_patch(hf_model(**TINY), torch.randn(2, 3, 61, 45))
print('legacy', transformers.__version__, 'ok', len(r.replaced))
"""


def test_patch_hf_legacy_layout():
    run_legacy(LEGACY)


def test_patched_model_compiles_without_graph_breaks():
    """Every fused op is a torch.library custom op (the native CPU kernel included) and backend
    resolution is constant to dynamo, so a patched model traces as one graph."""
    model = init_realistic_(segformer("b0", 5), seed=0).eval()
    ref = copy.deepcopy(model)
    segformer_fast.patch(model)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        assert rel_err(out, ref(x)) <= 1e-4
