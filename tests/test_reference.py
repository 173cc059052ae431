"""The reference ops against independent formulations (stock modules, SDPA, explicit loops)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segformer_fast import reference as R
from segformer_fast.testing import assert_contract, check_op, contract


def test_sra_attention_matches_sdpa_fp64():
    B, N, M, heads, d = 2, 37, 11, 5, 32
    q = torch.randn(B, N, heads * d, dtype=torch.float64)
    k = torch.randn(B, M, heads * d, dtype=torch.float64)
    v = torch.randn(B, M, heads * d, dtype=torch.float64)
    out = R.sra_attention(q, k, v, heads)
    split = lambda t: t.reshape(B, -1, heads, d).transpose(1, 2)
    sdpa = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(B, N, -1)
    torch.testing.assert_close(out, sdpa, rtol=1e-12, atol=1e-12)
    # explicit scale
    out2 = R.sra_attention(q, k, v, heads, scale=0.3)
    sdpa2 = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=0.3).transpose(1, 2).reshape(B, N, -1)
    torch.testing.assert_close(out2, sdpa2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_dwconv_gelu_matches_modules(approximate):
    B, H, W, C = 2, 7, 5, 12
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    conv = nn.Conv2d(C, C, 3, 1, 1, groups=C).double()
    expect = F.gelu(conv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2), approximate=approximate)
    got = R.dwconv_gelu(x, (H, W), conv.weight, conv.bias, approximate)
    torch.testing.assert_close(got, expect)
    # token (h, w) is row-major: check one position by hand
    h, w, c = 3, 0, 4
    patch = torch.zeros(3, 3, dtype=torch.float64)
    img = x[0, :, c].reshape(H, W)
    for i in range(3):
        for j in range(3):
            if 0 <= h + i - 1 < H and 0 <= w + j - 1 < W:
                patch[i, j] = img[h + i - 1, w + j - 1]
    pre = (patch * conv.weight[c, 0]).sum() + conv.bias[c]
    torch.testing.assert_close(got[0, h * W + w, c], F.gelu(pre, approximate=approximate))


@pytest.mark.parametrize("tokens", [False, True])
def test_conv_layernorm_matches_modules(tokens):
    B, Cin, H, W, Cout = 2, 6, 13, 9, 10
    conv = nn.Conv2d(Cin, Cout, 3, 2, 1).double()
    ln = nn.LayerNorm(Cout, eps=1e-6).double()
    img = torch.randn(B, Cin, H, W, dtype=torch.float64)
    expect = ln(conv(img).flatten(2).transpose(1, 2))
    x = img.flatten(2).transpose(1, 2) if tokens else img
    got, hw = R.conv_layernorm(x, conv.weight, conv.bias, ln.weight, ln.bias, 2, 1, 1e-6,
                               hw=(H, W) if tokens else None)
    assert hw == (7, 5)
    torch.testing.assert_close(got, expect)
    with pytest.raises(ValueError, match="hw"):
        R.conv_layernorm(img.flatten(2).transpose(1, 2), conv.weight, conv.bias, ln.weight, ln.bias, 2, 1, 1e-6)


def test_mlp_head_fuse_and_upsample_sum_agree():
    """The folded decoder (project at low resolution, upsample, sum) equals the concat form."""
    torch.manual_seed(1)
    B, D = 2, 8
    dims, hws = [4, 6, 10, 12], [(25, 33), (13, 17), (7, 9), (4, 5)]
    feats = [torch.randn(B, c, *hw, dtype=torch.float64) for c, hw in zip(dims, hws)]
    pw = [torch.randn(D, c, dtype=torch.float64) for c in dims]
    pb = [torch.randn(D, dtype=torch.float64) for _ in dims]
    fw = torch.randn(D, 4 * D, 1, 1, dtype=torch.float64)
    expect = R.mlp_head_fuse(feats, pw, pb, fw)
    blocks = fw.reshape(D, 4, D).unbind(1)[::-1]           # concat order is [c4, c3, c2, c1]
    maps = [R.nchw_to_tokens(f) @ (blk @ w).T for f, blk, w in zip(feats, blocks, pw)]
    bias = sum(blk @ b for blk, b in zip(blocks, pb))
    got = R.upsample_sum(maps, hws, hws[0], bias=bias)
    torch.testing.assert_close(R.tokens_to_nchw(got, hws[0]), expect)
    scale, shift = torch.rand(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    got2 = R.upsample_sum(maps, hws, hws[0], bias=bias, scale=scale, shift=shift, relu=True)
    torch.testing.assert_close(got2, torch.relu(got * scale + shift))


def test_contract_helper_can_fail():
    ref = torch.linspace(-1, 1, 100, dtype=torch.float64)
    pt = ref.float()
    assert contract(ref.float(), ref, pt).ok
    bad = ref.float().clone()
    bad[3] += 1e-3
    with pytest.raises(AssertionError, match="max\\|pt-ref\\|"):
        assert_contract(bad, ref, pt)
    nan = ref.float().clone()
    nan[0] = float("nan")
    assert not contract(nan, ref, pt).ok


def test_check_op_detects_wrong_gradient():
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2.001

    x = torch.randn(50, requires_grad=True)
    check_op(lambda t: t * 2, lambda t: t * 2, [x], torch.float32)
    with pytest.raises(AssertionError, match="grad"):
        check_op(WrongGrad.apply, lambda t: t * 2, [x], torch.float32)
