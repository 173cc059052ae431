"""The patched decode head: linear_fuse reassociated into the per-stage projections.

Eval logits match the original head (ours/NVlabs, HF >= 5.9, HF <= 5.8 in a subprocess) for a
B2-sized head on the features of a 2x3x97x131 image; training gradients, running statistics and
num_batches_tracked match; FLOPs of whole models drop; the cost model is sane."""
import copy

import pytest
import torch

from segformer_fast.models.segformer import SegFormerHead
import segformer_fast
from segformer_fast.testing import init_realistic_
from legacy_hf import run_legacy

K = pytest.importorskip("segformer_fast.kernels.triton.upsample_sum")

DIMS_B2, D_B2 = [64, 128, 320, 512], 768
HWS = [(25, 33), (13, 17), (7, 9), (4, 5)]          # MiT stage sizes of a 97x131 image


def _features(dims, B=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, c, h, w, generator=g).to(dtype) for c, (h, w) in zip(dims, HWS)]


def _ours(dims=DIMS_B2, D=D_B2, classes=19, seed=2):
    return init_realistic_(SegFormerHead(dims, D, classes), seed=seed)


def _hf(dims=DIMS_B2, D=D_B2, classes=19, seed=2, **kw):
    transformers = pytest.importorskip("transformers")
    from transformers import SegformerConfig
    from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

    cfg = SegformerConfig(hidden_sizes=dims, decoder_hidden_size=D, num_labels=classes, **kw)
    head = init_realistic_(SegformerDecodeHead(cfg), seed=seed)
    assert hasattr(head, "linear_projections"), transformers.__version__   # the >= 5.9 layout
    return head


def _patched(head, backend="torch"):
    """``head`` patched in place (the user's own instance): class and Parameters unchanged."""
    cls, params = type(head), list(head.parameters())
    report = segformer_fast.patch(head, backend=backend)
    assert report.replaced == [cls.__name__] and not report.skipped, str(report)
    assert type(head) is cls and all(p is q for p, q in zip(head.parameters(), params))
    return head


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _check_eval(head, feats, backend="torch", tol=1e-4):
    head = head.eval()
    fused = _patched(copy.deepcopy(head), backend)
    assert list(fused.state_dict()) == list(head.state_dict())
    with torch.no_grad():
        want, got = head(feats), fused(feats)
    assert got.shape == want.shape
    err = _rel(got, want)
    print(f"\n{type(head).__name__} eval logits: max|fused-orig|/max|orig| = {err:.2e}")
    assert err <= tol, err
    return fused


def _check_train(head, feats, dtype=torch.float32, tol=1e-3, backend="torch"):
    """Same step on two copies (same seed: same dropout masks): outputs, every parameter gradient
    (relative to its scale), running statistics and num_batches_tracked."""
    a = copy.deepcopy(head).to(dtype).train()
    b = _patched(copy.deepcopy(head).to(dtype).train(), backend)
    feats = [f.to(dtype) for f in feats]
    torch.manual_seed(7)
    ya = a(feats)
    torch.manual_seed(7)
    yb = b(feats)
    assert _rel(yb, ya) <= 1e-4
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ya.backward(g)
    yb.backward(g)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    weight_scale = max(p.grad.abs().max().item() for p in pa.values())
    worst = 0.0
    for name, p in pa.items():
        q = pb[name]
        scale = p.grad.abs().max().item()
        if name.endswith("proj.bias"):
            # a per-channel constant before batch-statistics BatchNorm: the true gradient is 0
            zero = (1e-9 if dtype == torch.float64 else 1e-5) * weight_scale
            assert scale <= zero and q.grad.abs().max().item() <= zero, (name, scale, weight_scale)
            continue
        err = (q.grad - p.grad).abs().max().item() / scale
        worst = max(worst, err)
        assert err <= tol, (name, err)
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    for name, t in ba.items():
        if t.is_floating_point():
            assert (bb[name] - t).abs().max().item() <= 1e-4 * t.abs().max().item(), name
        else:
            assert torch.equal(bb[name], t), name
    print(f"{type(head).__name__} train ({dtype}): worst relative gradient error {worst:.2e}")
    return worst


# ---------------------------------------------------------------- ours / NVlabs layout
def test_ours_b2_eval_matches():
    _check_eval(_ours(), _features(DIMS_B2))


def test_ours_b2_training_gradients_and_running_stats():
    head = _ours()
    head.dropout.p = 0.1                       # Dropout2d: same masks from the same seed
    _check_train(head, _features(DIMS_B2))


def test_ours_b2_training_exact_in_fp64():
    # in fp64 only the algebra is compared: the reassociation is exact to rounding
    head = _ours(dims=[32, 64, 160, 256], D=256)
    assert _check_train(head, _features([32, 64, 160, 256]), dtype=torch.float64) < 1e-12


def test_eval_cache_follows_parameter_updates():
    head = _ours(dims=[8, 12, 16, 20], D=24, classes=5).eval()
    stock = copy.deepcopy(head)
    fused = _patched(head)
    feats = _features([8, 12, 16, 20])
    with torch.no_grad():
        fused(feats)
        key = fused._sf_cache["key"]
        for m in (fused, stock):
            m.linear_c3.proj.weight.mul_(1.5)              # an optimizer step: version bump
            m.linear_fuse.bn.running_var.add_(0.25)
        torch.testing.assert_close(fused(feats), stock(feats))
        assert fused._sf_cache["key"] != key
        new = _ours(dims=[8, 12, 16, 20], D=24, classes=5, seed=9).state_dict()
        fused.load_state_dict(new), stock.load_state_dict(new)
        torch.testing.assert_close(fused(feats), stock(feats))
    assert list(fused.state_dict()) == list(stock.state_dict())   # nothing folded became state


def test_triton_backend_tiny_head_matches(monkeypatch):
    calls = []
    fwd = K.upsample_sum_fwd
    monkeypatch.setattr(K, "upsample_sum_fwd", lambda *a, **k: calls.append(1) or fwd(*a, **k))
    dims = [8, 12, 16, 20]
    head = _ours(dims=dims, D=24, classes=5)
    _check_eval(head, _features(dims, B=1), backend="triton")
    assert len(calls) == 1
    _check_train(head, _features(dims, B=1), backend="triton")
    assert len(calls) == 2


# ---------------------------------------------------------------- HF >= 5.9 layout (main env)
def test_hf_current_b2_eval_and_training():
    head = _hf()
    _check_eval(head, _features(DIMS_B2))
    head.dropout.p = 0.1        # element-wise nn.Dropout: same mask (both channels-last)
    _check_train(head, _features(DIMS_B2))


def test_hf_reshape_last_stage_false():
    # HF's branch for a 3-D last feature (side taken from the channel count, as HF does)
    dims = [8, 12, 16, 16]
    head = _hf(dims=dims, D=24, classes=5, reshape_last_stage=False).eval()
    feats = _features(dims[:3], B=2) + [torch.randn(2, 16, 16)]
    fused = _patched(copy.deepcopy(head))
    with torch.no_grad():
        torch.testing.assert_close(fused(feats), head(feats))
        torch.testing.assert_close(fused(encoder_hidden_states=feats), head(feats))


# ---------------------------------------------------------------- HF <= 5.8 layout (subprocess)
LEGACY_SCRIPT = r"""
import copy, torch, transformers
from transformers import SegformerConfig
from transformers.models.segformer.modeling_segformer import SegformerDecodeHead
import segformer_fast
from segformer_fast.testing import init_realistic_
assert int(transformers.__version__.split('.')[0]) < 5, transformers.__version__
dims, hws = [64, 128, 320, 512], [(25, 33), (13, 17), (7, 9), (4, 5)]
cfg = SegformerConfig(hidden_sizes=dims, decoder_hidden_size=768, num_labels=19)
head = init_realistic_(SegformerDecodeHead(cfg), seed=2).eval()
assert isinstance(head.linear_c, torch.nn.ModuleList)
g = torch.Generator().manual_seed(0)
feats = [torch.randn(2, c, h, w, generator=g) for c, (h, w) in zip(dims, hws)]
fused = copy.deepcopy(head)
assert segformer_fast.patch(fused, backend="torch").replaced == ["SegformerDecodeHead"]
assert list(fused.state_dict()) == list(head.state_dict())
with torch.no_grad():
    a, b = head(feats), fused(feats)
err = ((a - b).abs().max() / a.abs().max()).item()
assert err <= 1e-4, err
a = copy.deepcopy(head).train()
b = copy.deepcopy(head).train(); segformer_fast.patch(b, backend="torch")
torch.manual_seed(3); ya = a(feats)
torch.manual_seed(3); yb = b(feats)
gout = torch.randn(ya.shape)
ya.backward(gout); yb.backward(gout)
worst = 0.0
for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
    if n.endswith('proj.bias'):
        continue
    worst = max(worst, ((p.grad - q.grad).abs().max() / p.grad.abs().max()).item())
assert worst <= 1e-3, worst
for (n, s), (_, t) in zip(a.named_buffers(), b.named_buffers()):
    assert torch.allclose(s.double(), t.double(), rtol=0, atol=1e-4 * s.double().abs().max().item()), n
print('legacy', transformers.__version__, err, worst)
"""


def test_hf_legacy_layout():
    out = run_legacy(LEGACY_SCRIPT)
    print("\n" + out.strip())


# ---------------------------------------------------------------- FLOPs and cost model
def test_flops_drop_b0_b2_256():
    from segformer_fast.analysis.decode_head import flop_table, format_table

    rows = flop_table(("b0", "b2"), size=256)
    print("\n" + format_table(rows))
    ratio = {r["variant"]: r["ratio"] for r in rows}
    assert ratio["B2"] <= 0.40
    assert ratio["B0"] <= 0.45                 # B0's head is smaller (D = 256): same order
    for r in rows:
        assert r["head_gflops_after"] < 0.25 * r["head_gflops_before"]


def test_cost_model_sane():
    from segformer_fast.analysis.decode_head import head_cost, stage_sizes

    assert stage_sizes(97, 131) == HWS
    for dims, D in (([32, 64, 160, 256], 256), (DIMS_B2, D_B2)):
        for size in (512, 1024):
            c = head_cost(1, size, size, dims, D, dtype=torch.float16)
            ref, fused = c["reference"], c["fused"]
            assert fused.bytes < ref.bytes and fused.flops < ref.flops
            assert c["bytes_ratio"] > 3 and c["roofline_speedup"] > 3
            print(ref, "|", fused)


def test_patched_head_keeps_its_other_methods_and_attributes():
    """NVlabs' mmseg-0.x EncoderDecoder calls decode_head.forward_test/forward_train, mmseg 1.x
    predict/loss: the instance is the user's own, so they stay and run the fused forward."""

    class HeadWithAPI(SegFormerHead):
        def forward_test(self, inputs, img_metas=None, test_cfg=None):
            return self.forward(inputs)

    torch.manual_seed(0)
    head = init_realistic_(HeadWithAPI([8, 16, 24, 32], 16, 5), seed=1).eval()
    head.align_corners = False
    stock = copy.deepcopy(head)
    fused = _patched(head)
    feats = [torch.randn(2, c, s, s + 1) for c, s in zip([8, 16, 24, 32], [12, 6, 3, 2])]
    calls = []
    fused.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = fused.forward_test(feats)
    assert isinstance(fused, HeadWithAPI) and fused.align_corners is False
    with torch.no_grad():
        torch.testing.assert_close(out, stock(feats), rtol=1e-4, atol=1e-4 * stock(feats).abs().max().item())
        fused(feats)
    assert calls == [1]              # a hook on the patched instance fires on its calls


def test_hooked_projection_runs_the_stock_head_with_a_warning():
    """Folding reads weights: a projection hooked (or LoRA-wrapped) after patching would be read
    around. The head runs its stock forward instead (exact) and says so once."""
    head = _ours(dims=[8, 12, 16, 20], D=24, classes=5).eval()
    stock = copy.deepcopy(head)
    fused = _patched(head)
    feats = _features([8, 12, 16, 20])
    seen = []
    fused.linear_c2.proj.register_forward_hook(lambda m, i, o: seen.append(1) or o * 2)
    stock.linear_c2.proj.register_forward_hook(lambda m, i, o: o * 2)
    with torch.no_grad(), pytest.warns(UserWarning, match="stock forward"):
        out = fused(feats)
    torch.testing.assert_close(out, stock(feats))
    assert seen == [1]
