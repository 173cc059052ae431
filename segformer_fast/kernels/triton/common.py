"""What every kernel file in ``kernels/triton/`` shares: the one convention for writing a kernel.

A kernel file holds ``@triton.jit`` kernels, ``@triton.jit`` helpers for the tile prologues that
its forward and backward kernels share, one ``launch_config(kernel, ...) -> LaunchConfig`` that
decides every tile, warp and stage count, and launchers that allocate outputs and launch
``kernel[grid](..., **precision(dtype), **cfg.kwargs())``. Launchers do no input checks (the ops
layer does). Each kernel argument's shape is written beside it.

The ahead-of-time report (``segformer_fast.analysis.aot``) runs these launchers on meta tensors
and compiles what they would launch, so a configuration exists in exactly one place. Kernel files
never import ``analysis/``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The input/output dtypes every kernel takes, by their Triton names (reports, error messages).
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def interpreting() -> bool:
    """True when kernels run through the Triton interpreter (TRITON_INTERPRET=1, read by Triton
    when ``@triton.jit`` decorates, i.e. when a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def precision(dtype: torch.dtype) -> dict:
    """The two constexprs every kernel with a ``tl.dot`` takes.

    UPCAST: bf16 operands are converted to fp32 before any math, under the interpreter only (it
    gets bf16 arithmetic and bf16 ``tl.dot`` wrong); on a GPU bf16 stays on tensor cores.
    INPUT_PRECISION: "ieee" for fp32 dots (the numerics contract: no TF32 unless the user allowed
    it through ``torch.backends.cuda.matmul.allow_tf32``) and for upcast bf16; fp16/bf16 operands
    ignore it ("tf32", Triton's default, keeps their compiled code as Triton's default would)."""
    upcast = dtype == torch.bfloat16 and interpreting()
    fp32 = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return dict(UPCAST=upcast, INPUT_PRECISION="ieee" if (fp32 or upcast) else "tf32")


def store_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An empty contiguous output of ``shape`` for a kernel to store ``dtype`` into.

    Under the interpreter a bf16 output is an fp32 buffer that :func:`stored` rounds afterwards:
    the interpreter converts fp32 to bf16 by truncation (even with fp_downcast_rounding="rtne"),
    where a GPU rounds to nearest even, which doubles the bf16 error of every stored value."""
    if dtype == torch.bfloat16 and interpreting():
        dtype = torch.float32
    return torch.empty(shape, dtype=dtype, device=device)


def stored(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``buf`` from :func:`store_buffer` in ``dtype`` (rounded to nearest even where it was fp32)."""
    return buf if buf.dtype == dtype else buf.to(dtype)


class LaunchConfig:
    """Tiles, warps and pipeline stages of one kernel launch.

    ``blocks`` are the kernel's tile constexprs by name (BLOCK_M=64, ...): ``cfg["BLOCK_M"]``
    reads one, ``kernel[grid](..., **cfg.kwargs())`` passes them all with num_warps/num_stages.
    num_stages defaults to Triton's own CUDA default (3), so a kernel without a pipelined loop
    compiles exactly as if it were left out."""

    __slots__ = ("blocks", "num_warps", "num_stages")

    def __init__(self, num_warps: int = 4, num_stages: int = 3, **blocks: int):
        self.blocks = dict(blocks)
        self.num_warps = num_warps
        self.num_stages = num_stages

    def __getitem__(self, name: str) -> int:
        return self.blocks[name]

    def kwargs(self) -> dict:
        return dict(self.blocks, num_warps=self.num_warps, num_stages=self.num_stages)

    def __eq__(self, other) -> bool:
        return isinstance(other, LaunchConfig) and self.kwargs() == other.kwargs()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.kwargs().items())))

    def __repr__(self) -> str:
        return "LaunchConfig(" + ", ".join(f"{k}={v}" for k, v in self.kwargs().items()) + ")"


def pow2_block(n: int, lo: int = 16, hi: int | None = None) -> int:
    """Next power of two of ``n``, clamped to [lo, hi]: ``tl.arange`` needs a power of two and
    ``tl.dot`` needs at least 16 along every dim."""
    b = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return b if hi is None else min(hi, b)


@triton.jit
def row_tile(pid_r, pid_c, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets and masks of tile (pid_r, pid_c) of a row-major (R, C) matrix of tokens x channels:
    rows (BLOCK_R,), columns (BLOCK_C,), and their in-bounds masks."""
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return offs_r, offs_c, offs_r < R, offs_c < C


@triton.jit
def load_vec(ptr, offs, mask):
    """A per-channel parameter (bias, LayerNorm/BatchNorm affine) as an fp32 row (1, len(offs))."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)[None, :]
