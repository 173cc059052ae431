"""segformer_fast.nn._onednn: CPU inference linears through oneDNN, stock F.linear elsewhere."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segformer_fast.nn import _onednn
from segformer_fast.testing import assert_contract

pytestmark = pytest.mark.skipif(not _onednn._OK, reason="this torch has no oneDNN linear")


class _spy:
    """Counts calls of the oneDNN primitive."""

    def __enter__(self):
        self.calls, self.real = [], torch.ops.mkldnn._linear_pointwise
        calls, real = self.calls, self.real

        class Ops:
            def _linear_pointwise(self, *a):
                calls.append(a)
                return real(*a)
        self.orig = _onednn.torch.ops.mkldnn
        _onednn.torch.ops.mkldnn = Ops()
        return self.calls

    def __exit__(self, *exc):
        _onednn.torch.ops.mkldnn = self.orig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("view", ["tokens", "nchw_transposed"])
def test_contract(dtype, view):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(37, 19, generator=g).to(dtype), torch.randn(37, generator=g).to(dtype)
    if view == "tokens":
        x = (torch.randn(2, 45, 19, generator=g) * 20).to(dtype)
    else:   # what the decode head reads: (B, HW, C) view of a contiguous NCHW map
        x = (torch.randn(1, 19, 5, 9, generator=g) * 20).to(dtype).flatten(2).transpose(1, 2)
    with torch.no_grad(), _spy() as calls:
        out = _onednn.linear(x, w, b)
    assert len(calls) == 1 and out.dtype == dtype and out.shape == (*x.shape[:-1], 37)
    ref = F.linear(x.double(), w.double(), b.double())
    pt = F.linear(x, w, b)
    print(assert_contract(out, ref, pt, name=f"onednn linear {dtype} {view}"))


def test_stock_call_where_the_fast_path_must_not_run():
    """Gradients, autocast, a backend that asks for stock ops, a non-plain module: F.linear."""
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with _spy() as calls:
        y = _onednn.linear_module(lin)(x)                      # parameters need gradients
        y.sum().backward()
        assert lin.weight.grad is not None
        with torch.no_grad():
            _onednn.linear(x, lin.weight, lin.bias, backend="torch")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert _onednn.linear(x, lin.weight, lin.bias).dtype == torch.bfloat16
            lin.register_forward_hook(lambda m, i, o: o * 2)
            assert torch.equal(_onednn.linear_module(lin)(x), lin(x))   # hooked: the module runs
    assert calls == []
    with torch.no_grad(), _spy() as calls:
        _onednn.linear(x, lin.weight, lin.bias)
    assert len(calls) == 1
