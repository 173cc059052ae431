"""The CUDA emulation itself (csrc/cuda/emu): correct kernels give the right answers in every block
order, and planted bugs are caught — a missing barrier (NaN poison), a divergent barrier, an early
exit, a shuffle from a lane outside its mask, a deadlock, a device assert, launch limits."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

SELFTEST = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "emu" / "selftest.cu"


@pytest.fixture(scope="module")
def emu():
    # one g++ build per machine (cached by _build.py); CI has a compiler, so a failed build fails here
    from segformer_fast.kernels.cuda import emulated_build

    m = emulated_build()
    yield m
    m.emu_configure("sequential", 0, 1, 80)


@pytest.fixture(autouse=True)
def _default_order(emu):
    emu.emu_configure("sequential", 0, 1, 80)
    yield
    emu.emu_configure("sequential", 0, 1, 80)


def _line(kernel: str, text: str, nth: int = 0) -> int:
    """Source line of the nth occurrence of ``text`` inside ``kernel`` in selftest.cu."""
    lines = SELFTEST.read_text().splitlines()
    start = next(i for i, s in enumerate(lines) if kernel in s and "__global__" in s)
    hits = [i + 1 for i in range(start, len(lines)) if text in lines[i]]
    return hits[nth]


def _run(emu, name, inp=None, n=0, out_len=256, counter=False):
    inp = torch.zeros(1) if inp is None else inp
    out = torch.full((out_len,), -7.0)
    emu.emu_selftest(name, inp, out, n, counter)
    return out


@pytest.mark.parametrize("order", ["sequential", "shuffled"])
def test_barrier_makes_shared_memory_exchange_correct(emu, order):
    emu.emu_configure(order, 3, 1, 80)
    x = torch.arange(128, dtype=torch.float32)
    out = _run(emu, "reverse", x, 128, 128)
    assert torch.equal(out, x.flip(0))


def test_planted_missing_barrier_reads_nan_poison(emu):
    x = torch.arange(128, dtype=torch.float32)
    out = _run(emu, "reverse_no_barrier", x, 128, 128)
    # warps run as far as they can one after another: warps 0 and 1 read the slots of warps 3 and 2,
    # not written yet (NaN poison); warps 2 and 3 read what warps 1 and 0 already wrote
    assert torch.isnan(out[:64]).all(), out
    assert torch.equal(out[64:], x.flip(0)[64:])


def test_divergent_barrier_names_thread_and_lines(emu):
    with pytest.raises(RuntimeError) as e:
        _run(emu, "divergent_barrier")
    msg = str(e.value)
    a, b = _line("divergent_barrier_kernel", "__syncthreads", 0), _line("divergent_barrier_kernel", "__syncthreads", 1)
    assert "divergent __syncthreads" in msg, msg
    assert f"thread (0,0,0) waits at selftest.cu:{a}" in msg, msg
    assert f"thread (64,0,0) at selftest.cu:{b}" in msg, msg
    assert "block (0,0,0)" in msg, msg


def test_exit_before_barrier(emu):
    with pytest.raises(RuntimeError, match=r"thread \(5,0,0\) exited without reaching the __syncthreads at "
                       rf"selftest.cu:{_line('early_exit_kernel', '__syncthreads')}"):
        _run(emu, "early_exit")


def test_shuffle_rules_match_ptx(emu):
    x = torch.arange(32, dtype=torch.float32) - 10.0   # lanes 11.. positive for the ballot
    out = _run(emu, "shfl_rules", x, 32, 160)
    lane = torch.arange(32)
    xor5 = lane ^ 5
    down = torch.where(lane % 8 + 3 < 8, lane + 3, lane)      # delta 3, width 8: own value past the segment
    up = torch.where(lane % 16 >= 2, lane - 2, lane)          # delta 2, width 16
    idx = (7 * lane) % 32
    for k, src in enumerate((xor5, down, up, idx)):
        assert torch.equal(out[32 * k:32 * (k + 1)], x[src]), (k, out[32 * k:32 * (k + 1)], x[src])
    assert torch.equal(out[128:160], torch.full((32,), float((x > 0).sum())))


def test_shuffle_from_lane_outside_mask(emu):
    line = _line("shfl_outside_mask_kernel", "__shfl_sync")
    with pytest.raises(RuntimeError, match=rf"thread \(12,0,0\): shuffle at selftest.cu:{line} reads lane 16, "
                       r"which is not in the mask 0x0000ffff"):
        _run(emu, "shfl_outside_mask", torch.zeros(32), 32)


def test_warp_collective_deadlock(emu):
    with pytest.raises(RuntimeError, match=r"thread \(0,0,0\): __syncwarp with mask 0x00000003 .* can never "
                       r"complete: lane 1 of the mask waits at __syncthreads .*deadlock"):
        _run(emu, "deadlock")


def test_device_assert_names_block_thread_line(emu):
    x = torch.ones(16)
    x[7] = -1.0
    line = _line("assert_kernel", "SF_ASSERT")
    with pytest.raises(RuntimeError, match=rf"block \(0,0,0\) thread \(7,0,0\): device assertion "
                       rf"`in\[threadIdx.x\] >= 0.f` failed at selftest.cu:{line}"):
        _run(emu, "assert", x, 16)


@pytest.mark.parametrize("order,workers", [("sequential", 1), ("reverse", 1), ("shuffled", 1), ("shuffled", 2)])
def test_block_orders(emu, order, workers):
    emu.emu_configure(order, 5, workers, 80)
    out = _run(emu, "block_order", n=50, out_len=50, counter=True)
    assert sorted(out.tolist()) == list(range(50))           # every block ran exactly once
    ticket = out.long()
    if order == "sequential":
        assert torch.equal(ticket, torch.arange(50))
    elif order == "reverse":
        assert torch.equal(ticket, torch.arange(49, -1, -1))
    elif workers == 1:
        assert not torch.equal(ticket, torch.arange(50))


@pytest.mark.parametrize("name,dtype", [("mma_f16", torch.float16), ("mma_bf16", torch.bfloat16)])
def test_mma_m16n8k16(emu, name, dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 8, generator=g)
    out = _run(emu, name, torch.cat([a.flatten(), b.flatten()]), 0, 128).view(16, 8)
    exact = a.to(dtype).double() @ b.to(dtype).double()
    assert (out.double() - exact).abs().max() < 1e-5, (out.double() - exact).abs().max()


@pytest.mark.parametrize("name,dtype", [("convert_f16", torch.float16), ("convert_bf16", torch.bfloat16)])
def test_conversions_round_like_torch(emu, name, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(3000, generator=g) * 10.0 ** torch.randint(-9, 6, (3000,), generator=g),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.9, 65520.0, 1e-8, 2.0 ** -24, 3 * 2.0 ** -25,
                                 float("inf"), float("-inf"), float("nan"), 3.4e38])])
    out = _run(emu, name, x, x.numel(), x.numel())
    want = x.to(dtype).float()
    assert torch.equal(out.nan_to_num(123.0), want.nan_to_num(123.0))
    assert torch.equal(out.isnan(), want.isnan())


def test_launch_limits(emu):
    out = _run(emu, "smem", n=48 * 1024)                      # 48 KB needs no opt-in
    assert torch.equal(out[:64], torch.ones(64))
    with pytest.raises(RuntimeError, match="more than 48 KB needs cudaFuncSetAttribute"):
        _run(emu, "smem", n=64 * 1024)
    out = _run(emu, "smem", n=64 * 1024, counter=True)        # opted in
    assert torch.equal(out[:64], torch.ones(64))
    with pytest.raises(RuntimeError, match="exceeds the sm_80 limit of 166912 bytes"):
        _run(emu, "smem", n=200 * 1024, counter=True)
    emu.emu_configure("sequential", 0, 1, 90)
    _run(emu, "smem", n=200 * 1024, counter=True)             # H100 allows 227 KB
    _run(emu, "threads", n=1024, out_len=1024)
    with pytest.raises(RuntimeError, match=r"block dims exceed \(1024, 1024, 64\)"):
        _run(emu, "threads", n=1025, out_len=1025)
