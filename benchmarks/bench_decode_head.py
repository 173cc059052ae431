"""Timing of the folded SegFormer decoder at real shapes, and its FLOP table.

- ``upsample_sum`` op: ``fused`` (our op as ``auto`` runs it: ``triton`` on CUDA, the native kernel
  on CPU, the torch composition where gradients are needed), ``reference``, ``stock`` (the strongest stock alternative:
  contiguous NCHW maps, F.interpolate, in-place adds, then BatchNorm-affine + ReLU).
- whole head: ``original`` (our NVlabs-named SegFormerHead: concat + 1x1 linear_fuse at H/4) vs
  ``fused`` (the head patched by ``segformer_fast.patch``, ``auto`` backend), eval forward and training fwd+bwd.
- FLOPs (FlopCounterMode) of whole models B0-B5 at 512² before/after patching the decode head,
  recorded in ``extra_info`` (``segformer_fast.analysis.decode_head.flop_table``).

CPU: 512² B0 only (the Triton path needs a GPU at real shapes); B2 and 1024² are CUDA-only.
"""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from segformer_fast import reference
from segformer_fast.analysis.decode_head import flop_table, format_table, stage_sizes
from segformer_fast.models.segformer import VARIANTS, SegFormerHead
import segformer_fast
from segformer_fast.ops.upsample_sum import upsample_sum
from segformer_fast.testing import init_realistic_

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="CUDA-only case")

# (label, variant, batch, image side)
CPU_SHAPES = [("b0_512", "b0", 1, 512)]
GPU_SHAPES = [("b0_1024", "b0", 1, 1024), ("b2_512", "b2", 2, 512), ("b2_1024", "b2", 2, 1024)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _info(benchmark, device, dtype, **kw):
    benchmark.extra_info.update(
        dtype=str(dtype), device=torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or platform.machine(), torch=torch.__version__,
        threads=torch.get_num_threads(), **kw)


# ---------------------------------------------------------------- the op
def stock(maps, hws, size, bias, scale, shift):
    B, _, D = maps[0].shape
    total = None
    for m, hw in zip(maps, hws):
        x = m.transpose(1, 2).reshape(B, D, *hw).contiguous()
        if tuple(hw) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        total = x if total is None else total.add_(x) if total.requires_grad is False else total + x
    y = torch.relu((total + bias[:, None, None]) * scale[:, None, None] + shift[:, None, None])
    return y.flatten(2).transpose(1, 2)


OP_IMPLS = {
    # what ``auto`` runs in a patched model: Triton on CUDA; on CPU the native kernel for
    # inference and the torch composition where gradients are needed (the kernel has no backward)
    "fused": lambda maps, hws, size, *p: upsample_sum(maps, hws, size, *p, relu=True, backend="auto"),
    "torch": lambda maps, hws, size, *p: upsample_sum(maps, hws, size, *p, relu=True, backend="torch"),
    "reference": lambda maps, hws, size, *p: reference.upsample_sum(maps, hws, size, *p, relu=True),
    "stock": stock,
}


def _run_op(benchmark, impl, shape, device, dtype, backward):
    label, variant, B, side = shape
    D = VARIANTS[variant][2]
    hws = stage_sizes(side, side)
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(B, h * w, D, generator=g).to(device, dtype).requires_grad_(backward) for h, w in hws]
    params = [(torch.randn(D, generator=g) * s + m).to(device, dtype).requires_grad_(backward)
              for m, s in ((0.0, 0.2), (1.0, 0.2), (0.0, 0.2))]
    dy = torch.randn(B, hws[0][0] * hws[0][1], D, generator=g).to(device, dtype)
    fn = OP_IMPLS[impl]

    def body():
        if backward:
            torch.autograd.backward(fn(maps, hws, hws[0], *params), dy)
            for t in maps + params:
                t.grad = None
        else:
            with torch.no_grad():
                fn(maps, hws, hws[0], *params)
        _sync(device)

    _info(benchmark, device, dtype, op="upsample_sum", impl=impl, shape=label, B=B, D=D, hws=hws,
          pass_="fwd+bwd" if backward else "fwd")
    benchmark(body)


@pytest.mark.parametrize("impl", list(OP_IMPLS))
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=[s[0] for s in CPU_SHAPES])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_cpu_op(benchmark, impl, shape, backward):
    _run_op(benchmark, impl, shape, torch.device("cpu"), torch.float32, backward)


@gpu
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(OP_IMPLS))
@pytest.mark.parametrize("shape", CPU_SHAPES + GPU_SHAPES, ids=[s[0] for s in CPU_SHAPES + GPU_SHAPES])
def test_cuda_op(benchmark, impl, shape, backward):
    _run_op(benchmark, impl, shape, torch.device("cuda"), torch.float16, backward)


# ---------------------------------------------------------------- the whole head
def _run_head(benchmark, impl, shape, device, dtype, training):
    label, variant, B, side = shape
    dims, _, D = VARIANTS[variant]
    head = init_realistic_(SegFormerHead(dims, D, 150), seed=1).to(device, dtype).train(training)
    if impl == "fused":
        segformer_fast.patch(head, backend="auto")
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(B, c, h, w, generator=g).to(device, dtype)
             for c, (h, w) in zip(dims, stage_sizes(side, side))]

    def body():
        if training:
            head(feats).float().square().mean().backward()
            head.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                head(feats)
        _sync(device)

    _info(benchmark, device, dtype, op="decode_head", impl=impl, shape=label, B=B, D=D,
          pass_="train fwd+bwd" if training else "eval fwd")
    benchmark(body)


@pytest.mark.parametrize("impl", ["original", "fused"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=[s[0] for s in CPU_SHAPES])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_cpu_head(benchmark, impl, shape, training):
    _run_head(benchmark, impl, shape, torch.device("cpu"), torch.float32, training)


@gpu
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("impl", ["original", "fused"])
@pytest.mark.parametrize("shape", CPU_SHAPES + GPU_SHAPES, ids=[s[0] for s in CPU_SHAPES + GPU_SHAPES])
def test_cuda_head(benchmark, impl, shape, training):
    _run_head(benchmark, impl, shape, torch.device("cuda"), torch.float16, training)


# ---------------------------------------------------------------- FLOPs (shapes only: meta device)
@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "b4", "b5"])
def test_flops_512(benchmark, variant):
    rows = []
    benchmark.pedantic(lambda: rows.append(flop_table((variant,), size=512)[0]), rounds=1, iterations=1)
    row = rows[-1]
    benchmark.extra_info.update(op="flop_table", **row)
    print("\n" + format_table([row]))
    assert row["ratio"] < 0.75 and row["head_gflops_after"] < 0.25 * row["head_gflops_before"]
