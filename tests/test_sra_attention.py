"""Spatial-reduction attention: Triton kernels (interpreter), torch backend, op checks, no N x M
allocation (AOT compile: tests/test_kernels_aot.py; cost model: tests/test_cost_models.py; the patched modules: tests/test_parts.py)."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from segformer_fast import reference
from segformer_fast.kernels.triton import sra_attention as K
from segformer_fast.ops.sra_attention import sra_attention
from segformer_fast.testing import check_op

KERNELS = ("_sra_fwd_kernel", "_sra_bwd_dq_kernel", "_sra_bwd_dkdv_kernel")


class _Counting:
    """Stands in for a @triton.jit kernel in the launcher module and counts real launches."""

    def __init__(self, fn, counts, name):
        self.fn, self.counts, self.name = fn, counts, name

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1
            return launch(*args, **kwargs)
        return run


@pytest.fixture
def launches(monkeypatch):
    counts: dict[str, int] = {}
    for name in KERNELS:
        monkeypatch.setattr(K, name, _Counting(getattr(K, name), counts, name))
    return counts


# (heads, head_dim, N, M, batch, q/k magnitude): the shapes
CASES = [
    pytest.param(5, 32, 221, 7, 2, 1.0, id="h5d32-N221-M7-B2"),
    pytest.param(2, 64, 221, 1, 2, 1.0, id="h2d64-N221-M1-B2"),
    pytest.param(1, 64, 300, 37, 2, 1.0, id="h1d64-N300-M37-B2"),
    pytest.param(8, 32, 23, 23, 1, 6.0, id="h8d32-N23-M23-sharp"),
    pytest.param(1, 32, 97, 131, 1, 1.0, id="h1d32-N97-M131-multitile"),
    # SegFormer scale (CUDA only): B0 stage 1 at 512^2 (16384 queries, 256 keys), B2 stage 3
    pytest.param(1, 32, 16384, 256, 2, 1.0, id="b0-stage1-512", marks=pytest.mark.gpu),
    pytest.param(5, 64, 1024, 256, 2, 3.0, id="b2-stage3-512", marks=pytest.mark.gpu),
]


def _inputs(heads, d, N, M, B, mag, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    C = heads * d
    q = (torch.randn(B, N, C, generator=g) * mag).to(device).requires_grad_()
    # k and v as the two column halves of one (B, M, 2C) kv projection, like the module passes
    kv = torch.randn(B, M, 2 * C, generator=g)
    kv[..., :C] *= mag
    return q, kv.to(device).requires_grad_()


def _split_kv(fn, heads, backend=None):
    def run(q, kv):
        C = q.shape[-1]
        k, v = kv[..., :C], kv[..., C:]
        if backend is None:
            return fn(q, k, v, heads)
        return fn(q, k, v, heads, backend=backend)
    return run


@pytest.mark.parametrize("heads,d,N,M,B,mag", CASES)
def test_triton_contract(heads, d, N, M, B, mag, launches, device):
    q, kv = _inputs(heads, d, N, M, B, mag, device=device)
    fused = _split_kv(sra_attention, heads, "triton")
    ref = _split_kv(reference.sra_attention, heads)
    results = check_op(fused, ref, [q, kv], torch.float32, name="sra fp32")
    assert launches == {"_sra_fwd_kernel": 1, "_sra_bwd_dq_kernel": 1, "_sra_bwd_dkdv_kernel": 1}
    results += check_op(fused, ref, [q, kv], torch.float16, backward=False, name="sra fp16")
    results += check_op(fused, ref, [q, kv], torch.bfloat16, backward=False, name="sra bf16")
    assert launches["_sra_fwd_kernel"] == 3
    for r in results:
        print(r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("heads,d,N,M,B,mag", [CASES[3], CASES[4]])
def test_triton_half_backward(heads, d, N, M, B, mag, dtype, launches, device):
    """Beyond the required fp32 backward: fp16/bf16 gradients (bf16 math upcast in the
    interpreter only) on the sharp-softmax and multi-key-tile cases."""
    q, kv = _inputs(heads, d, N, M, B, mag, device=device)
    for r in check_op(_split_kv(sra_attention, heads, "triton"), _split_kv(reference.sra_attention, heads),
                      [q, kv], dtype, name=f"sra {dtype}"):
        print(r)
    assert launches["_sra_bwd_dkdv_kernel"] == 1


def test_triton_padded_head_dim_and_scale(launches, device):
    """Head dim 40 (padded to 64 with masking), explicit scale, contiguous separate k and v."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 120, generator=g).to(device).requires_grad_() for n in (70, 19, 19))
    check_op(lambda q, k, v: sra_attention(q, k, v, 3, 0.3, backend="triton"),
             lambda q, k, v: reference.sra_attention(q, k, v, 3, 0.3), [q, k, v], torch.float32)
    assert launches["_sra_fwd_kernel"] == 1


def test_triton_head_dim_128(launches, device):
    q, kv = _inputs(1, 128, 40, 20, 1, 1.0, seed=3, device=device)
    fused = _split_kv(sra_attention, 1, "triton")
    ref = _split_kv(reference.sra_attention, 1)
    check_op(fused, ref, [q, kv], torch.float32, name="sra d128 fp32")
    check_op(fused, ref, [q, kv], torch.float16, backward=False, name="sra d128 fp16")
    assert launches["_sra_fwd_kernel"] == 2


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_key_bias_gradient(backend, launches, device):
    """k = x Wk^T + bk: d(bk) = sum over keys of dK is exactly 0 in theory (softmax is shift
    invariant per query row); the kernel's rounding there must stay within the contract."""
    g = torch.Generator().manual_seed(2)
    B, N, M, C, heads = 2, 221, 37, 64, 2
    q = torch.randn(B, N, C, generator=g).requires_grad_()
    xk = torch.randn(B, M, C, generator=g)
    wk = (torch.randn(C, C, generator=g) / C ** 0.5).requires_grad_()
    bk = (torch.randn(C, generator=g) * 0.2).requires_grad_()
    v = torch.randn(B, M, C, generator=g).requires_grad_()
    q, xk, wk, bk, v = (t.detach().to(device).requires_grad_(t.requires_grad) for t in (q, xk, wk, bk, v))

    def make(fn, **kw):
        return lambda q, xk, wk, bk, v: fn(q, F.linear(xk, wk, bk), v, heads, **kw)
    res = check_op(make(sra_attention, backend=backend), make(reference.sra_attention),
                   [q, xk, wk, bk, v], torch.float32, name=f"sra k-bias {backend}")
    for r in res:
        print(r)
    assert launches.get("_sra_bwd_dkdv_kernel", 0) == (backend == "triton")


@pytest.mark.parametrize("heads,d,N,M,B,mag", CASES)
def test_torch_backend_contract(heads, d, N, M, B, mag, launches, device):
    q, kv = _inputs(heads, d, N, M, B, mag, device=device)
    fused = _split_kv(sra_attention, heads, "torch")
    ref = _split_kv(reference.sra_attention, heads)
    check_op(fused, ref, [q, kv], torch.float32, name="torch fp32")
    check_op(fused, ref, [q, kv], torch.float16, backward=False, name="torch fp16")
    assert launches == {}


def _ok():
    return torch.randn(2, 10, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)


@pytest.mark.parametrize("mutate,heads,exc,match", [
    (lambda q, k, v: (q[0], k, v), 2, ValueError, "rank 3"),
    (lambda q, k, v: (q, k[:1], v[:1]), 2, ValueError, "batch"),
    (lambda q, k, v: (q, k[..., :4], v), 2, ValueError, "channels"),
    (lambda q, k, v: (q, k, v[:, :2]), 2, ValueError, "same number of tokens"),
    (lambda q, k, v: (q, k[:, :0], v[:, :0]), 2, ValueError, "M >= 1"),
    (lambda q, k, v: (q, k, v), 3, ValueError, "divisible"),
    (lambda q, k, v: (q, k.half(), v), 2, TypeError, "dtype"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), 2, TypeError, "floating"),
    (lambda q, k, v: (q, k, v.to("meta")), 2, ValueError, "device"),
    (lambda q, k, v: (torch.randn(1, 4, 130), torch.randn(1, 2, 130), torch.randn(1, 2, 130)), 1,
     ValueError, "triton: head dim 130 > 128"),
])
def test_bad_inputs_raise_before_launch(mutate, heads, exc, match, launches):
    with pytest.raises(exc, match=match):
        sra_attention(*mutate(*_ok()), heads, backend="triton")
    assert launches == {}


def test_no_n_by_m_allocation(launches, device):
    """Record every tensor the fused forward + backward allocates: none has B*H*N*M elements."""
    from torch.utils._python_dispatch import TorchDispatchMode

    B, N, M, heads, d = 2, 221, 37, 8, 8      # B*H*N*M = 130832 > every legit tensor (B*N*C = 28288)
    q, kv = _inputs(heads, d, N, M, B, 1.0, device=device)
    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    sizes.append((str(func), t.numel()))
            return out

    with Record():
        out = _split_kv(sra_attention, heads, "triton")(q, kv)
        out.backward(torch.ones_like(out))
    assert launches == {"_sra_fwd_kernel": 1, "_sra_bwd_dq_kernel": 1, "_sra_bwd_dkdv_kernel": 1}
    assert sizes, "dispatch mode saw nothing"
    biggest = max(sizes, key=lambda s: s[1])
    assert biggest[1] < B * heads * N * M // 2, biggest


# ---------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend, launches):
    torch._dynamo.reset()
    q, kv = _inputs(2, 32, 40, 9, 1, 1.0)
    fn = _split_kv(sra_attention, 2, backend)
    t = time.time()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, kv)
    out.sum().backward()
    torch.testing.assert_close(out, fn(q.detach(), kv.detach()), rtol=1e-5, atol=1e-5)
    print(f"torch.compile({backend}) {time.time() - t:.1f}s")
    assert bool(launches) == (backend == "triton")
