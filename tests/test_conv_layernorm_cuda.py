"""The CUDA C++ conv + LayerNorm (csrc/cuda/conv_layernorm.cu).

Without a GPU: ``conv_layernorm(..., backend="cuda")`` runs the kernels in the CUDA emulation
(SEGFORMER_FAST_CUDA_EMULATE=1, CPU tensors) against the fp64 reference on the Triton twin's odd
shapes plus the CUDA tiles' edge cases (Cout not a multiple of 8 or 16, both block shapes, the
widest Cout 512, 1x1 and 9x1 maps), fp32/fp16/bf16 forward and backward, in two block orders
(sequential; shuffled blocks and warps on two worker threads); the .cu compiles with nvcc for
sm_80 and sm_90a with 0 spills. With a GPU: the nvcc build on CUDA tensors.
"""
from __future__ import annotations


import pytest
import torch

from segformer_fast import backends
from segformer_fast import reference as R
from segformer_fast.kernels import cuda as K
from segformer_fast.ops.conv_layernorm import conv_layernorm
from segformer_fast.testing import check_op
from test_conv_layernorm import CASES as TRITON_CASES, make_args
# the attention test's emulation fixtures (emulated build; block orders) and ptxas parser
from cuda_testing import ARCHS, assert_no_spills, emu, needs_nvcc, order  # noqa: F401

# (name, B, Cin, H, W, Cout, k, stride, padding, tokens, eps): the Triton twin's cases, then
# 9x1 output map (tokens), Cout 100 (not a multiple of 8: a partly padded 8-column tile) and 20
# (the 64-token block), the stage-3 embedding width 160 and the widest, 512 (16 tiles per warp).
CASES = [c for c in TRITON_CASES] + [
    ("sr4_9x1_map", 2, 24, 36, 7, 40, 4, 4, 0, True, 1e-6),
    ("image_k3s2p1_cout100", 1, 5, 13, 10, 100, 3, 2, 1, False, 1e-5),
    ("tokens_k7s4p3_cout20", 1, 16, 17, 11, 20, 7, 4, 3, True, 1e-5),
    ("tokens_k3s2p1_cout160", 2, 32, 7, 9, 160, 3, 2, 1, True, 1e-6),
    ("sr2_cout512", 1, 16, 6, 10, 512, 2, 2, 0, True, 1e-6),
]
IDS = [c[0] for c in CASES]


def cuda_op(*args):
    return conv_layernorm(*args, backend="cuda")


def _run(args, dtypes, tag, backward=True):
    for dtype in dtypes:
        for r in check_op(cuda_op, R.conv_layernorm, args, dtype, backward=backward, name=tag):
            print(r)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_contract(case, order):
    """fp32/fp16/bf16 forward and backward (every input's gradient) in both block orders."""
    _run(make_args(*case[1:]), (torch.float32, torch.float16, torch.bfloat16), f"{order} {case[0]}")


@pytest.mark.parametrize("bias,affine", [(False, False), (True, False), (False, True)],
                         ids=["neither", "bias-only", "affine-only"])
def test_without_bias_or_affine(emu, bias, affine):
    args = make_args(1, 24, 11, 13, 40, 3, 2, 1, True, 1e-5, bias=bias, affine=affine)
    _run(args, (torch.float32, torch.bfloat16), f"bias={bias} affine={affine}")
    args = make_args(1, 12, 9, 9, 72, 3, 2, 1, False, 1e-6, bias=bias, affine=affine, seed=5)
    _run(args, (torch.float16,), f"cout72 bias={bias} affine={affine}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_large_magnitude(emu, dtype):
    # inputs of magnitude ~300 (conv outputs ~1e2..1e3: fp16-safe, LayerNorm must cancel the scale)
    args = make_args(2, 40, 23, 31, 72, 3, 2, 1, True, 1e-6, scale=300.0, seed=3)
    _run(args, (dtype,), "large", backward=dtype == torch.float32)


def test_non_contiguous_and_strided_inputs(emu):
    """Tokens that are a transposed view of an NCHW map, and a channels-last image: both read
    through strides by the same kernel."""
    B, C, H, W = 2, 16, 10, 12
    g = torch.Generator().manual_seed(1)
    img = torch.randn(B, C, H, W, generator=g)
    w, b = torch.randn(48, C, 2, 2, generator=g) / 8, torch.randn(48, generator=g)
    gam, bet = torch.randn(48, generator=g) * 0.3 + 1, torch.randn(48, generator=g) * 0.2
    ref, rhw = R.conv_layernorm(img.double(), w.double(), b.double(), gam.double(), bet.double(), 2, 0, 1e-5)
    tok = img.flatten(2).transpose(1, 2)                       # not contiguous
    for x, hw in ((tok, (H, W)), (img.contiguous(memory_format=torch.channels_last), None)):
        out, ohw = conv_layernorm(x, w, b, gam, bet, 2, 0, 1e-5, hw, backend="cuda")
        assert ohw == rhw == (5, 6)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic(emu):
    """dbias/dgamma/dbeta are per-block fp32 partial rows added in a fixed order: bitwise equal
    across block orders and concurrent workers."""
    x, w, b, gam, _, stride, padding, eps, hw = make_args(2, 40, 23, 31, 72, 3, 2, 1, True, 1e-6)
    x4 = x.detach().view(2, 23, 31, 40).permute(0, 3, 1, 2)
    dy = torch.randn(2, 12 * 16, 72)
    runs = []
    for setting in (("sequential", 0, 1), ("shuffled", 1, 2), ("reverse", 0, 2)):
        emu.emu_configure(*setting, 80)
        runs.append(K.conv_layernorm_bwd_dz(dy, x4, w.detach(), b.detach(), gam.detach(), (2, 2), (1, 1), eps))
    emu.emu_configure("sequential", 0, 1, 80)
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)


def test_shared_memory_needs_no_opt_in(emu):
    """Every tile fits the 48 KB any CUDA GPU gives without opt-in (the emulation refuses more
    without cudaFuncSetAttribute); the widest launches run under sm_75's limits."""
    from segformer_fast.analysis.cuda_conv_layernorm import tiles

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert max(tiles(c, dtype)["smem_bytes"] for c in range(1, 513)) <= 48 * 1024
    emu.emu_configure("sequential", 0, 1, 75)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x, w = torch.randn(1, 8, 4, 4, dtype=dtype), torch.randn(512, 8, 2, 2, dtype=dtype)
            y = K.conv_layernorm_fwd(x, w, None, None, None, (2, 2), (0, 0), 1e-5)
            K.conv_layernorm_bwd_dz(torch.ones_like(y), x, w, None, None, (2, 2), (0, 0), 1e-5)
    finally:
        emu.emu_configure("sequential", 0, 1, 80)


def test_dispatch_and_refusals(emu):
    """Named, the emulation runs CPU tensors; auto never picks it; Cout > 512 and float64 are
    refused with reasons before any launch; without the opt-in the CPU build is refused."""
    assert backends.which("conv_layernorm", "cpu", torch.float16, backend="cuda").name == "cuda"
    assert backends.which("conv_layernorm", "cpu", torch.float32).name != "cuda"
    bad = backends.which("conv_layernorm", "cpu", torch.float32, backend="cuda", facts={"cout": 520})
    assert bad.name is None and "cuda: Cout 520 > 512" in bad.error
    assert "float64" in backends.which("conv_layernorm", "cpu", torch.float64, backend="cuda").error
    x, w = torch.randn(1, 4, 6, 6), torch.randn(520, 4, 2, 2)
    with pytest.raises(backends.BackendUnavailable, match="Cout 520 > 512"):
        conv_layernorm(x, w, None, None, None, 2, 0, 1e-5, backend="cuda")
    with pytest.raises(RuntimeError, match="Cout = 520 not in"):    # the binding's own guard
        K.conv_layernorm_fwd(x, w, None, None, None, (2, 2), (0, 0), 1e-5)


def test_emulation_refuses_without_opt_in(monkeypatch):
    monkeypatch.delenv(K.EMULATE_ENV, raising=False)
    x, w = torch.randn(1, 4, 6, 6), torch.randn(8, 4, 2, 2)
    with pytest.raises(backends.BackendUnavailable, match="cuda: CPU tensors need SEGFORMER_FAST_CUDA_EMULATE=1"):
        conv_layernorm(x, w, None, None, None, 2, 0, 1e-5, backend="cuda")


def test_empty_batch(emu):
    x = torch.randn(0, 4, 6, 6, requires_grad=True)
    w = torch.randn(8, 4, 2, 2, requires_grad=True)
    out, hw = conv_layernorm(x, w, None, None, None, 2, 0, 1e-5, backend="cuda")
    assert out.shape == (0, 9, 8) and hw == (3, 3)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_opcheck(emu):
    """Schema, fake kernels, autograd registration of the two custom ops (emulated build)."""
    g = torch.Generator().manual_seed(0)
    x4 = torch.randn(1, 6, 7, 9, generator=g)
    w, b, gw, gb = torch.randn(24, 6, 3, 3, generator=g), *(torch.randn(24, generator=g) for _ in range(3))
    y = torch.ops.segformer_fast.cuda_conv_layernorm(x4, w, b, gw, gb, [2, 2], [1, 1], 1e-5)
    torch.library.opcheck(torch.ops.segformer_fast.cuda_conv_layernorm.default,
                          (x4.requires_grad_(), w.requires_grad_(), b, gw, gb, [2, 2], [1, 1], 1e-5))
    torch.library.opcheck(torch.ops.segformer_fast.cuda_conv_layernorm_backward.default,
                          (torch.randn_like(y), x4.detach(), w.detach(), b, gw, [2, 2], [1, 1], 1e-5, True, True))


def test_autocast_runs_in_the_lower_dtype(emu):
    args = make_args(1, 8, 9, 9, 24, 3, 2, 1, False, 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = conv_layernorm(*args, backend="cuda")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert args[0].grad.dtype == torch.float32 and args[1].grad.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[-1]], ids=[CASES[0][0], CASES[1][0], CASES[-1][0]])
def test_gpu_contract(case):
    args = make_args(*case[1:], device="cuda")
    _run(args, (torch.float32, torch.float16, torch.bfloat16), f"gpu {case[0]}")


# ------------------------------------------------------------------------------ nvcc, ahead of time
@needs_nvcc
@pytest.mark.parametrize("arch", list(ARCHS))
def test_nvcc_no_spills(arch):
    """conv_layernorm.cu as the GPU build compiles it: all 13 kernels (fwd and dz for 3 dtypes x
    2 block shapes, the reduction) with 0 spill bytes; registers printed."""
    assert len(assert_no_spills("cuda/conv_layernorm.cu", arch)) == 13


def test_traffic_model():
    """B1 stage-2 patch embedding at 512x512 (64 -> 128 channels, k3 s2 p1, 128x128 in): the conv
    output never reaches HBM; 128 channels are 4 tiles per warp with no padding; Cout 40 pads to 64."""
    from segformer_fast.analysis.conv_layernorm import conv_layernorm_cost
    from segformer_fast.analysis.cuda_conv_layernorm import cuda_conv_layernorm_cost

    m = cuda_conv_layernorm_cost(1, 64, 128, 128, 128, 3, 2, 1, torch.float16)
    x, y, w = 64 * 128 * 128 * 2, 64 * 64 * 128 * 2, 128 * 576 * 2
    assert m["hbm"].bytes == x + 3 * w + 3 * 128 * 2 + y
    assert m["blocks"]["fwd"] == 64 * 64 // 16 and m["padding_overhead"] < 1e-9
    ref = conv_layernorm_cost(1, 64, 128, 128, 128, 3, 2, 1, torch.float16, tokens=True)["reference"]
    assert m["hbm"].bytes < ref.bytes / 2
    both = cuda_conv_layernorm_cost(1, 64, 128, 128, 128, 3, 2, 1, torch.float16, backward=True)
    assert both["blocks"] == {"fwd": 256, "dz": 256, "reduce": 12}
    assert cuda_conv_layernorm_cost(1, 8, 8, 8, 40, 2, 2, 0)["padding_overhead"] > 64 / 40 - 1 - 1e-9
    print(m["hbm"], f"L2 {m['l2_bytes'] / 1e6:.1f} MB;", both["hbm"])
