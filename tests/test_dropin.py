"""Drop-in means drop-in: a patched model against its stock twin under the tools users run.

Hugging Face >= 5.9 (this environment), <= 5.8 (a subprocess with the legacy release), the seed
document's NVlabs-style model and smp's own source files, each under: fp16/bf16 autocast (forward
and a training step), inference_mode (inference-tensor parameters included), torch.compile
(fullgraph, repeated, no_grad and inference_mode, two input sizes), torch.export (static and
dynamic batch/H/W), ONNX export run in ONNX Runtime, output_attentions/output_hidden_states,
hooks registered before patching, isinstance, save/from_pretrained, gradient checkpointing and
PEFT LoRA in both orders. Low-precision runs are judged like the op contract: the patched
model's error against the fp32 stock model may be at most twice the stock model's own error
under the same autocast (plus a small floor), never an absolute tolerance that hides a bug.
"""
import copy
import warnings

import pytest
import torch

import segformer_fast
from segformer_fast.testing import init_realistic_

from legacy_hf import run_legacy
from seed_model import load_seed_module

transformers = pytest.importorskip("transformers")
from transformers import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402

TINY = dict(hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1],
            decoder_hidden_size=32, num_labels=5)
X = (2, 3, 67, 61)          # stage 1 17x16 (keys 2x2), odd everywhere
X2 = (1, 3, 45, 77)         # another batch and size: new shapes for compile and export


def hf_model(**kw):
    torch.manual_seed(0)
    cfg = dict(TINY, **kw)
    return init_realistic_(SegformerForSemanticSegmentation(SegformerConfig(**cfg)), seed=2).eval()


def logits(model, x, **kw):
    out = model(pixel_values=x, **kw) if isinstance(model, transformers.PreTrainedModel) or hasattr(
        model, "base_model") else model(x)
    return out.logits if hasattr(out, "logits") else out


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def twin(model, backend="auto"):
    """(stock, patched) copies of ``model``; the patch report must name no skipped part."""
    stock, patched = copy.deepcopy(model), copy.deepcopy(model)
    report = segformer_fast.patch(patched, backend=backend)
    assert report.replaced and not report.skipped, str(report)
    return stock, patched


def loss_of(out):
    return (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()


# ----------------------------------------------------------------------------- shared checks
def check_autocast(model, call, x, dtype):
    """Forward and one training step under CPU autocast, against fp32 stock."""
    stock, patched = twin(model)
    with torch.no_grad():
        ref = call(stock, x)
        with torch.autocast("cpu", dtype=dtype):
            a, b = call(stock, x), call(patched, x)
    assert b.dtype == a.dtype
    assert rel(b, ref) <= 2 * rel(a, ref) + 1e-3, (rel(b, ref), rel(a, ref))
    grads = []
    for m in (stock, patched, copy.deepcopy(stock)):
        m.train()
        torch.manual_seed(5)
        if len(grads) < 2:
            with torch.autocast("cpu", dtype=dtype):
                loss = loss_of(call(m, x))
        else:
            loss = loss_of(call(m, x))       # the fp32 reference step
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    g_stock, g_patched, g_ref = grads
    assert g_patched.shape == g_ref.shape and torch.isfinite(g_patched).all()
    assert rel(g_patched, g_ref) <= 3 * rel(g_stock, g_ref) + 1e-3, (rel(g_patched, g_ref), rel(g_stock, g_ref))


def check_inference_mode(model, call, x):
    """Parameters that are inference tensors (model copied under inference_mode), and a normal
    model called under inference_mode repeatedly."""
    stock, patched = twin(model)
    with torch.inference_mode():
        inf = copy.deepcopy(stock)
        assert next(inf.parameters()).is_inference()
    segformer_fast.patch(inf)
    with torch.inference_mode():
        ref = call(stock, x)
        for m in (inf, patched, patched):
            assert rel(call(m, x), ref) <= 1e-4


def check_export(model, call, x, x2, dynamic):
    stock, patched = twin(model)
    kwargs = {"pixel_values": x} if isinstance(model, transformers.PreTrainedModel) else None
    args = () if kwargs else (x,)
    spec = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    shapes = None
    if dynamic:
        shapes = {"pixel_values": spec} if kwargs else (spec,)
    ep = torch.export.export(patched, args, kwargs, dynamic_shapes=shapes, strict=False)
    run = ep.module()
    with torch.no_grad():
        for inp in ([x, x2] if dynamic else [x]):
            out = run(pixel_values=inp) if kwargs else run(inp)
            out = out.logits if hasattr(out, "logits") else out
            assert rel(out, call(stock, inp)) <= 1e-4


def check_hooks_and_classes(model):
    """Every patched module keeps its class; a forward hook registered before patching fires."""
    stock = copy.deepcopy(model)
    fired = []
    for m in model.modules():
        m.register_forward_hook(lambda mod, i, o, name=type(m).__name__: fired.append(name))
    report = segformer_fast.patch(model)
    classes = {p: type(model.get_submodule(p)) if p else type(model) for p in report.replaced}
    for path, cls in classes.items():
        assert cls is type(stock.get_submodule(path) if path else stock)
        assert "forward" in vars(model.get_submodule(path) if path else model)
    assert list(model.state_dict()) == list(stock.state_dict())
    return fired, report


# ----------------------------------------------------------------------------- HF >= 5.9
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_hf_autocast(dtype):
    check_autocast(hf_model(), logits, torch.randn(*X), dtype)


def test_hf_inference_mode():
    check_inference_mode(hf_model(), logits, torch.randn(*X))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_hf_export(dynamic):
    check_export(hf_model(), logits, torch.randn(*X), torch.randn(3, 3, 83, 77), dynamic)


def test_hf_compile_fullgraph_repeated_no_grad_inference_mode_two_sizes():
    """The k/v and fold caches used to read data_ptr()/_version in traced code; aot_eager keeps
    the test to dynamo + AOTAutograd (inductor's first CPU compile alone takes ~1 min here)."""
    torch._dynamo.reset()
    stock, patched = twin(hf_model())
    with torch.no_grad():
        # HF installs its output-capturing hooks under a lock dynamo cannot enter: the stock
        # model too needs one eager call before a fullgraph compile
        patched(pixel_values=torch.randn(*X2))
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    for x in (torch.randn(*X), torch.randn(*X2)):
        with torch.no_grad():
            ref = logits(stock, x)
            for _ in range(2):
                assert rel(logits(compiled, x), ref) <= 1e-4
        with torch.inference_mode():
            assert rel(logits(compiled, x), ref) <= 1e-4


def test_hf_onnx_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    stock, patched = twin(hf_model())

    class Logits(torch.nn.Module):                 # ONNX wants tensors out
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(pixel_values=x).logits

    x = torch.randn(*X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Logits(patched), (x,), dynamo=True, verbose=False)
    program.save(str(tmp_path / "patched.onnx"))
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert not any(n.domain.startswith("segformer_fast") for n in program.model_proto.graph.node), ops
    sess = ort.InferenceSession(str(tmp_path / "patched.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert rel(torch.from_numpy(out), logits(stock, x)) <= 1e-4


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_output_attentions_and_hidden_states(impl):
    stock, patched = twin(hf_model(attn_implementation=impl))
    x = torch.randn(*X)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")         # HF warns that sdpa cannot return attentions
        a = stock(pixel_values=x, output_attentions=True, output_hidden_states=True)
        b = patched(pixel_values=x, output_attentions=True, output_hidden_states=True)
    assert len(b.attentions) == len(a.attentions) == (4 if impl == "eager" else len(a.attentions))
    for u, v in zip(a.attentions, b.attentions):
        torch.testing.assert_close(v, u)
    assert len(b.hidden_states) == len(a.hidden_states) == 4
    for u, v in zip(a.hidden_states, b.hidden_states):
        assert rel(v, u) <= 1e-4
    assert rel(b.logits, a.logits) <= 1e-4
    with torch.no_grad():                        # and the fused path again when not asked
        assert rel(logits(patched, x), logits(stock, x)) <= 1e-4


def test_hf_hooks_isinstance_and_unpatch():
    from transformers.models.segformer import modeling_segformer as M
    model = hf_model()
    fired, report = check_hooks_and_classes(model)
    assert isinstance(model.decode_head, M.SegformerDecodeHead)
    assert all(isinstance(b.attention, M.SegformerAttention) for s in model.segformer.stages for b in s.blocks)
    stock = hf_model()
    x = torch.randn(*X)
    with torch.no_grad():
        fired.clear()
        assert rel(logits(model, x), logits(stock, x)) <= 1e-4
    for name in ("SegformerAttention", "SegformerMixMLP", "SegformerOverlapPatchEmbeddings",
                 "SegformerDecodeHead"):
        assert name in fired, name
    assert segformer_fast.unpatch(model) == len(report.replaced)
    assert not any("forward" in vars(m) for m in model.modules())


def test_hf_save_and_from_pretrained(tmp_path):
    stock, patched = twin(hf_model())
    patched.save_pretrained(tmp_path)
    loaded = SegformerForSemanticSegmentation.from_pretrained(tmp_path).eval()
    x = torch.randn(*X)
    with torch.no_grad():
        ref = logits(stock, x)
        assert rel(logits(loaded, x), ref) <= 1e-6         # the same weights, unpatched
        segformer_fast.patch(loaded)
        assert rel(logits(loaded, x), ref) <= 1e-4


def test_hf_gradient_checkpointing_training_step():
    stock, patched = twin(hf_model())
    grads = []
    for m in (stock, patched):
        m.gradient_checkpointing_enable()
        m.train()
        torch.manual_seed(3)
        loss_of(logits(m, torch.randn(*X, generator=torch.Generator().manual_seed(1)))).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert rel(grads[1], grads[0]) <= 1e-3


@pytest.mark.parametrize("order", ["lora_then_patch", "patch_then_lora"])
def test_hf_peft_lora(order):
    peft = pytest.importorskip("peft")

    def lora(m):
        # init_lora_weights=False: random A and B, so the adapters change the output
        cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj", "linear_projections.2.proj"],
                              init_lora_weights=False, r=4, lora_alpha=8)
        return peft.get_peft_model(m, cfg).eval()

    base = hf_model()
    torch.manual_seed(9)
    stock = lora(copy.deepcopy(base))
    if order == "lora_then_patch":
        patched = copy.deepcopy(stock)
        report = segformer_fast.patch(patched)
        # the head's projection is a LoRA layer: folding would read around it, so it is refused
        assert [p for p, _ in report.skipped] == ["base_model.model.decode_head"], str(report)
        assert len(report.replaced) == 12, str(report)
    else:
        patched = copy.deepcopy(base)
        assert len(segformer_fast.patch(patched).replaced) == 13
        patched = lora(patched)
        patched.load_state_dict(stock.state_dict())
    x = torch.randn(*X)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = logits(stock, x)
        assert rel(ref, logits(base, x)) > 0.05          # the adapters matter
        assert rel(logits(patched, x), ref) <= 1e-4
    if order == "patch_then_lora":                       # the patched head saw the adapter late
        assert any("stock forward" in str(w.message) for w in caught)
    patched.train(), stock.train()
    for m in (stock, patched):
        torch.manual_seed(4)
        loss_of(logits(m, x)).backward()
    trained = [(n, p, q) for (n, p), (_, q) in zip(stock.named_parameters(), patched.named_parameters())
               if p.requires_grad]
    assert trained and all("lora" in n for n, _, _ in trained)
    for n, p, q in trained:
        assert rel(q.grad, p.grad) <= 1e-3, n


# ----------------------------------------------------------------------------- HF <= 5.8
LEGACY = r"""
import copy, warnings, torch, transformers, peft, segformer_fast
from test_dropin import hf_model, logits, rel, twin, check_autocast, check_inference_mode, check_export, X
assert int(transformers.__version__.split('.')[0]) < 5, transformers.__version__
m = hf_model()
assert hasattr(m.segformer, 'encoder')
check_autocast(m, logits, torch.randn(*X), torch.bfloat16)
check_inference_mode(m, logits, torch.randn(*X))
check_export(m, logits, torch.randn(*X), None, False)
stock, patched = twin(hf_model())
x = torch.randn(*X)
with torch.no_grad():
    a = stock(pixel_values=x, output_attentions=True, output_hidden_states=True)
    b = patched(pixel_values=x, output_attentions=True, output_hidden_states=True)
assert len(a.attentions) == len(b.attentions) == 4
for u, v in zip(a.attentions, b.attentions):
    torch.testing.assert_close(v, u)
cfg = peft.LoraConfig(target_modules=["query", "value"], init_lora_weights=False, r=4, lora_alpha=8)
torch.manual_seed(9); s = peft.get_peft_model(copy.deepcopy(m), cfg).eval()
p = copy.deepcopy(s); segformer_fast.patch(p)
q = copy.deepcopy(m); segformer_fast.patch(q); q = peft.get_peft_model(q, cfg).eval(); q.load_state_dict(s.state_dict())
with torch.no_grad():
    ref = logits(s, x)
    assert rel(ref, logits(m, x)) > 0.05
    assert rel(logits(p, x), ref) <= 1e-4 and rel(logits(q, x), ref) <= 1e-4
print('legacy', transformers.__version__, 'ok')
"""


def test_hf_legacy_layout():
    run_legacy(LEGACY)


# ----------------------------------------------------------------------------- seed and smp
def seed_model():
    mod = load_seed_module()
    if mod is None:
        pytest.skip("seed document not found (../shared/seed)")
    torch.manual_seed(0)
    return init_realistic_(mod.SegFormer("B0", num_classes=5), seed=3).eval()


def smp_model():
    from smp_source import load
    from test_smp import SmpSegformer
    torch.manual_seed(0)
    return init_realistic_(SmpSegformer(load(), classes=5, seg_channels=64), seed=3).eval()


def plain_call(model, x):
    return model(x)


@pytest.mark.parametrize("make", [seed_model, smp_model], ids=["seed", "smp"])
def test_other_codebases_under_the_tools(make):
    model = make()
    x, x2 = torch.randn(2, 3, 67, 61), torch.randn(1, 3, 64, 96)
    check_autocast(model, plain_call, x, torch.bfloat16)
    check_inference_mode(model, plain_call, x)
    check_export(model, plain_call, x, x2, dynamic=False)
    fired, _ = check_hooks_and_classes(model)
    with torch.no_grad():
        fired.clear()
        model(x)
    assert fired
