"""The ops under the user's tooling: torch.compile with dynamic shapes, torch.export with dynamic
batch/H/W (Dim.AUTO), inference_mode, and ONNX export run in ONNX Runtime.

One tiny module chains all four ops the way a SegFormer stage does (patch embedding, sequence
reduction on tokens, attention, Mix-FFN core, decoder sum), so every size an op checks is derived
from the input's (symbolic) size.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from segformer_fast.ops import conv_layernorm, dwconv_gelu, sra_attention, upsample_sum
from segformer_fast.testing import init_realistic_


class Stage(nn.Module):
    def __init__(self, backend: str | None = None, C: int = 16, heads: int = 2):
        super().__init__()
        self.backend, self.heads = backend, heads
        self.embed, self.embed_norm = nn.Conv2d(3, C, 3, 2, 1), nn.LayerNorm(C)
        self.sr, self.sr_norm = nn.Conv2d(C, C, 2, 2), nn.LayerNorm(C)
        self.dw = nn.Conv2d(C, C, 3, 1, 1, groups=C)
        self.bias = nn.Parameter(torch.zeros(C))
        init_realistic_(self)

    def forward(self, x):
        kw = dict(backend=self.backend)
        t, (H, W) = conv_layernorm(x, self.embed.weight, self.embed.bias, self.embed_norm.weight,
                                   self.embed_norm.bias, 2, 1, 1e-5, **kw)
        kv, (h, w) = conv_layernorm(t, self.sr.weight, self.sr.bias, self.sr_norm.weight, self.sr_norm.bias,
                                    2, 0, 1e-6, hw=(H, W), **kw)
        t = t + sra_attention(t, kv, kv, self.heads, **kw)
        t = dwconv_gelu(t, (H, W), self.dw.weight, self.dw.bias, **kw)
        return upsample_sum([t, kv], [(H, W), (h, w)], (H, W), bias=self.bias, relu=True, **kw)


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_dynamic_fullgraph(backend):
    """fullgraph, dynamic=True: one graph, no recompile for a new size, same numbers as eager;
    called under no_grad and inference_mode too."""
    torch._dynamo.reset()
    m = Stage(backend).eval()
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in ((2, 3, 12, 16), (1, 3, 20, 12)):
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-4)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_export_dynamic_batch_hw(backend):
    """torch.export with Dim.AUTO batch/H/W: the symbolic sizes pass every op's checks (and the
    custom ops' fake kernels); the exported program runs at another size."""
    from torch.export import Dim, export
    m = Stage(backend).eval()
    x = torch.randn(2, 3, 16, 20)
    ep = export(m, (x,), dynamic_shapes={"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}}, strict=False)
    free = {str(s) for node in ep.graph.nodes if node.op == "placeholder" and "val" in node.meta
            for s in getattr(node.meta["val"], "shape", ()) if not str(s).isdigit()}
    assert len(free) == 3, f"batch, H and W should stay symbolic: {free}"
    y = torch.randn(3, 3, 24, 12)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(y), m(y), rtol=1e-4, atol=1e-4)


def test_inference_mode_parameters():
    """Parameters that are inference tensors (a model built under inference_mode)."""
    with torch.inference_mode():
        m = Stage("auto")
        x = torch.randn(1, 3, 12, 12)
        out = m(x)
    ref = Stage("reference")
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert _rel_err(out, ref(x.clone())) <= 1e-4


def test_onnx_export_runs_in_onnxruntime():
    """Under torch.onnx.export(dynamo=True) ``auto`` resolves every op to its stock composition:
    the graph holds no segformer_fast op, and ONNX Runtime reproduces eager within 1e-4 of scale,
    at the exported size and (dynamic batch/H/W) another one."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m = Stage("auto").eval()
    x = torch.randn(1, 3, 16, 20)
    from torch.export import Dim
    prog = torch.onnx.export(m, (x,), dynamo=True, verbose=False,
                             dynamic_shapes={"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}})
    domains = {n.domain for n in prog.model_proto.graph.node}
    assert not any("segformer" in d for d in domains), domains
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for shape in ((1, 3, 16, 20), (2, 3, 12, 24)):
        y = torch.randn(shape)
        with torch.no_grad():
            ref = m(y)
        got = torch.from_numpy(sess.run(None, {name: y.numpy()})[0])
        err = _rel_err(got, ref)
        print(f"ONNX Runtime vs eager at {shape}: {err:.2e} of scale")
        assert err <= 1e-4, err


def test_onnx_export_refuses_kernel_backends_by_name(monkeypatch):
    """While an ONNX export traces, a backend named explicitly that ONNX Runtime cannot run is
    refused with the reasons (not captured into a graph that fails later); ``auto`` and ``torch``
    give the stock composition."""
    from torch.onnx._internal.exporter import _flags

    from segformer_fast.backends import BackendUnavailable, which
    monkeypatch.setattr(_flags, "_is_onnx_exporting", True)
    assert torch.onnx.is_in_onnx_export()
    for op in ("sra_attention", "dwconv_gelu", "conv_layernorm", "upsample_sum"):
        assert which(op, "cuda", torch.float16).name == "torch"
        assert which(op, "cpu", torch.float32, backend="cpu").name in ("cpu", None)
    assert which("upsample_sum", "cpu", backend="cpu").name is None       # the native kernel
    with pytest.raises(BackendUnavailable, match="triton: .*not exportable to ONNX"):
        Stage("triton")(torch.randn(1, 3, 8, 8))
    with pytest.raises(Exception):
        torch.onnx.export(Stage("triton").eval(), (torch.randn(1, 3, 8, 8),), dynamo=True, verbose=False)
