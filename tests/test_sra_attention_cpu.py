"""The native bf16 CPU attention kernel (csrc/cpu/sra_attention.cpp) against the reference, its
dispatch (bf16 inference on AVX512-BF16 only; the forced fallback gives SDPA) and a patched model
under CPU autocast."""
import copy
import functools

import pytest
import torch

from segformer_fast import backends
from segformer_fast import reference as R
from segformer_fast.ops import sra_attention
from segformer_fast.testing import check_op
from native_testing import count_native

_count_native = functools.partial(count_native, entry="sra_attention_bf16_forward")


@pytest.fixture(scope="module")
def native():
    # built once per machine (cached); CI has a compiler, so a failed build fails here
    from segformer_fast.kernels.cpu import native as load

    n = load()
    if not n.cpu_has_bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16: the kernel cannot run (dispatch tests below still run)")
    return n


def _qkv(B, N, M, heads, d, mag, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = heads * d
    q = torch.randn(B, N, C, generator=g) * mag
    kv = torch.randn(B, M, 2 * C, generator=g) * mag      # k, v as column halves: strided rows
    return q, kv[..., :C], kv[..., C:]


# odd N, M not a multiple of the 32-key padding (1, 5, 33, 61, 257), batch > 1, every head dim the
# kernel takes, and large magnitudes (saturated softmax rows)
CASES = [(2, 37, 5, 1, 32, 1.0), (1, 101, 33, 2, 32, 3.0), (3, 77, 61, 2, 64, 1.0), (1, 50, 17, 1, 128, 2.0),
         (2, 19, 1, 3, 96, 1.0), (1, 300, 257, 5, 32, 1.0), (2, 45, 40, 2, 32, 8.0)]


@pytest.mark.parametrize("B,N,M,heads,d,mag", CASES)
def test_contract(native, B, N, M, heads, d, mag):
    q, k, v = _qkv(B, N, M, heads, d, mag)
    scale = d ** -0.5

    def fused(q, k, v):
        return sra_attention(q, k, v, heads, scale, backend="cpu")

    def ref(q, k, v):
        return R.sra_attention(q, k, v, heads, scale)
    with _count_native(native) as calls, torch.inference_mode():
        for r in check_op(fused, ref, [q, k, v], torch.bfloat16, backward=False, name="cpu"):
            print(r)
    assert len(calls) == 1


def test_dispatch_and_forced_fallback(native, monkeypatch):
    q, k, v = (t.bfloat16() for t in _qkv(2, 37, 29, 2, 32, 1.0))
    with _count_native(native) as calls, torch.no_grad():
        out = sra_attention(q, k, v, 2)
    assert len(calls) == 1 and out.dtype == torch.bfloat16
    # what auto does not give the kernel: fp32, a head dim off its tiles, calls needing gradients
    assert backends.which("sra_attention", "cpu", torch.float32, facts={"head_dim": 32}).name == "torch"
    assert backends.which("sra_attention", "cpu", torch.bfloat16, facts={"head_dim": 40}).name == "torch"
    assert backends.which("sra_attention", "cpu", torch.bfloat16, needs_grad=True,
                          facts={"head_dim": 32}).name == "torch"
    with pytest.raises(backends.BackendUnavailable, match="cpu: head dim 40 is not a multiple of 32"):
        sra_attention(*(t.bfloat16() for t in _qkv(1, 5, 3, 1, 40, 1.0)), 1, backend="cpu")
    # forced fallback: SDPA runs, bit for bit the torch backend
    monkeypatch.setenv("SEGFORMER_FAST_CPU_ISA", "portable")
    with _count_native(native) as calls, torch.no_grad():
        fallback = sra_attention(q, k, v, 2)
        stock = sra_attention(q, k, v, 2, backend="torch")
    assert calls == [] and torch.equal(fallback, stock)
    assert "no AVX512-BF16" in str(backends.which("sra_attention", "cpu", torch.bfloat16, backend="cpu"))


def test_patched_model_in_bf16(native):
    """A patched tiny HF SegFormer in bf16, under CPU autocast and cast with ``.to(torch.bfloat16)``,
    runs the kernel in every attention and stays as close to the fp32 stock logits as its stock
    twin in the same precision."""
    transformers = pytest.importorskip("transformers")
    import segformer_fast
    from segformer_fast.testing import init_realistic_

    cfg = transformers.SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[4, 2],
                                       hidden_sizes=[32, 64], num_attention_heads=[1, 2], decoder_hidden_size=32,
                                       num_labels=5)
    torch.manual_seed(0)
    stock = init_realistic_(transformers.SegformerForSemanticSegmentation(cfg)).eval()
    patched = copy.deepcopy(stock)
    segformer_fast.patch(patched)
    x = torch.randn(2, 3, 61, 45)
    with torch.inference_mode():
        want = stock(pixel_values=x).logits
        scale = want.abs().max()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            twin = stock(pixel_values=x).logits.float()
            with _count_native(native) as calls:
                ours = patched(pixel_values=x).logits.float()
        assert len(calls) == 2
        err, twin_err = (ours - want).abs().max() / scale, (twin - want).abs().max() / scale
        print(f"autocast: patched {err:.2e} vs stock {twin_err:.2e} (relative to the fp32 logits' scale)")
        assert err <= 2 * twin_err + 1e-3
        xb = x.bfloat16()
        twin = copy.deepcopy(stock).to(torch.bfloat16)(pixel_values=xb).logits.float()
        with _count_native(native) as calls:
            ours = copy.deepcopy(patched).to(torch.bfloat16)(pixel_values=xb).logits.float()
        assert len(calls) == 2
        err, twin_err = (ours - want).abs().max() / scale, (twin - want).abs().max() / scale
        print(f".to(bf16): patched {err:.2e} vs stock {twin_err:.2e}")
        assert err <= 2 * twin_err + 1e-3
