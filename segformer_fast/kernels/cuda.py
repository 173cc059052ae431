"""The CUDA C++ kernels of ``csrc/cuda``, built on first use (ninja JIT, cached per machine by
``_build.py``), in one of two builds of the same sources:

- GPU: on CUDA tensors, nvcc for sm_80 and sm_90a (``torch.utils.cpp_extension.load`` of
  ``bindings/cuda.cpp`` + the ``.cu`` files; needs a CUDA torch, nvcc and ninja).
- Emulated: on CPU tensors when ``SEGFORMER_FAST_CUDA_EMULATE=1``, the kernel sources compiled as
  C++ and run by the CUDA emulation of ``csrc/cuda/emu`` (blocks in sequence, shuffled or across
  workers; a block's threads as fibers; checked barriers and warp collectives; NaN-poisoned shared
  memory). A correctness tool, like the Triton interpreter: never a default, never fast.

Launchers here do no argument checking beyond what the raw-pointer code relies on (the op in
``segformer_fast.ops`` validates first) and have the Triton launchers' contract.
"""
from __future__ import annotations

import os
import shutil

import torch

EMULATE_ENV = "SEGFORMER_FAST_CUDA_EMULATE"

GPU_SOURCES = ("bindings/cuda.cpp", "cuda/sra_attention.cu", "cuda/conv_layernorm.cu",
               "cuda/dwconv_gelu.cu", "cuda/upsample_sum.cu", "cuda/resize_argmax.cu")
# .cpp translation units only: a CPU-only torch refuses .cu sources (kernels.cpp includes them)
EMU_SOURCES = ("bindings/cuda.cpp", "cuda/emu/runtime.cpp", "cuda/emu/kernels.cpp")
GPU_CFLAGS = ("-O3",)
# naming the archs turns torch's TORCH_CUDA_ARCH_LIST default flags off
GPU_CUDA_CFLAGS = ("-O3", "-std=c++17", "-gencode=arch=compute_80,code=sm_80",
                   "-gencode=arch=compute_90a,code=sm_90a")
EMU_CFLAGS = ("-O2", "-DSF_CUDA_EMULATE")


def emulating() -> bool:
    """Whether CPU tensors may run the CUDA kernels through the emulation."""
    return os.environ.get(EMULATE_ENV, "0") == "1"


def gpu_build():
    """The nvcc-built extension (CUDA torch only)."""
    from .._build import load

    return load("segformer_fast_cuda", GPU_SOURCES, GPU_CFLAGS, (), GPU_CUDA_CFLAGS)


def emulated_build():
    """The emulated build (any torch, g++ with x86-64 or ucontext): the same kernels on CPU tensors."""
    from .._build import load

    return load("segformer_fast_cuda_emu", EMU_SOURCES, EMU_CFLAGS)


def native(device: torch.device):
    """The build that runs on ``device``; ValueError when there is none."""
    if device.type == "cuda":
        return gpu_build()
    if device.type == "cpu" and emulating():
        return emulated_build()
    raise ValueError(f"the cuda kernels need CUDA tensors, or CPU tensors with {EMULATE_ENV}=1 (the "
                     f"CUDA emulation); got device {device}")


def build_problem(device_type: str) -> str | None:
    """Why the build for ``device_type`` tensors cannot be made here, from cheap facts only (the
    build itself runs on the first call; a failure then raises): None when it can."""
    if shutil.which("ninja") is None:
        return "ninja is not installed (the CUDA kernels are JIT-built on first use)"
    if device_type == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        if torch.version.cuda is None:
            return "needs a CUDA build of torch"
        if CUDA_HOME is None:
            return "nvcc / the CUDA toolkit was not found (set CUDA_HOME)"
        return None
    if device_type == "cpu":
        if not emulating():
            return f"CPU tensors need {EMULATE_ENV}=1 (the CUDA emulation) or CUDA tensors"
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            return "no C++ compiler found for the emulated build"
        return None
    return f"no build for {device_type} tensors"


def configure_emulation(order: str = "sequential", seed: int = 0, workers: int = 1, arch: int = 80) -> None:
    """Emulation settings for later launches: block ``order`` ("sequential", "reverse" or "shuffled",
    with ``seed``; shuffled also shuffles the warp order inside each block), ``workers`` OS threads
    running blocks concurrently, and the compute capability ``arch`` whose limits are enforced."""
    emulated_build().emu_configure(order, seed, workers, arch)


def sra_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, N, C), k and v (B, M, C) with channel stride 1 (k, v may be column halves of one
    (B, M, 2C) tensor) -> O (B, N, C) contiguous and LSE (B*num_heads, N) fp32 in log2 units."""
    return tuple(native(q.device).sra_attention_fwd(q, k, v, num_heads, float(scale)))


def sra_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      lse: torch.Tensor, num_heads: int, scale: float):
    """dQ (B, N, C), dK and dV (B, M, C), contiguous in the input dtype; ``lse`` from the forward.
    Deterministic: dK/dV are fp32 partial sums per query chunk, added in a fixed order."""
    do = do if do.stride(-1) == 1 else do.contiguous()
    return tuple(native(q.device).sra_attention_bwd(do, q, k, v, lse, num_heads, float(scale)))


def conv_weight_km(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, kh, kw) -> (Cout, K) with k = (kh, kw, cin), K contiguous: the reduction order of
    the implicit GEMM (a one-off permute of a tensor far smaller than the activations)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def conv_layernorm_fwd(x: torch.Tensor, weight: torch.Tensor, bias, gamma, beta, stride, padding,
                       eps: float) -> torch.Tensor:
    """x (B, Cin, H, W) with any strides (NCHW image, or the channels-last view of tokens), weight
    (Cout, Cin, kh, kw), bias/gamma/beta (Cout,) or None, Cout <= 512 -> tokens (B, Ho*Wo, Cout)."""
    kh, kw = weight.shape[-2:]
    if x.shape[0] == 0:      # an empty grid is not a launch
        H, W = x.shape[-2:]
        Ho, Wo = (H + 2 * padding[0] - kh) // stride[0] + 1, (W + 2 * padding[1] - kw) // stride[1] + 1
        return x.new_empty((0, Ho * Wo, weight.shape[0]))
    return native(x.device).conv_layernorm_fwd(x, conv_weight_km(weight), kh, kw, bias, gamma, beta,
                                               list(stride), list(padding), float(eps))


def conv_layernorm_bwd_dz(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias, gamma, stride,
                          padding, eps: float):
    """d(conv output) dz as tokens (B, Ho*Wo, Cout) in x's dtype, and fp32 (3, Cout) = [dbias, dgamma,
    dbeta]: per-block partial sums added in a fixed order (deterministic)."""
    kh, kw = weight.shape[-2:]
    if x.shape[0] == 0:
        return torch.empty_like(dy, dtype=x.dtype), x.new_zeros((3, weight.shape[0]), dtype=torch.float32)
    return tuple(native(x.device).conv_layernorm_bwd(dy.contiguous(), x, conv_weight_km(weight), kh, kw, bias,
                                                     gamma, list(stride), list(padding), float(eps)))


def dwconv_gelu_fwd(x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias, approximate: str) -> torch.Tensor:
    """y = gelu(dwconv3x3(x) + bias) on contiguous tokens x (B, H*W, C); weight (C, 1, 3, 3), bias (C,)
    or None, contiguous in x's dtype; ``approximate`` "none" (erf) or "tanh"."""
    if x.numel() == 0:       # an empty grid is not a launch
        return torch.empty_like(x)
    return native(x.device).dwconv_gelu_fwd(x, H, W, weight, bias, approximate == "tanh")


def dwconv_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias,
                    approximate: str, partial_rows: int = 0):
    """(dx (B, H*W, C) in x's dtype, dweight (C, 1, 3, 3) and dbias (C,) in weight's dtype) in one fused
    pass (g = dy * gelu'(pre) stays in shared memory) + a fixed-order reduction of fp32 per-block
    partials (deterministic). ``partial_rows`` > 0 caps the blocks along the tiles (tests use it to
    make every block walk several tiles)."""
    if x.numel() == 0:
        return torch.empty_like(x), torch.zeros_like(weight), weight.new_zeros(weight.shape[0])
    dx, dw, db = native(x.device).dwconv_gelu_bwd(dy.contiguous(), x, H, W, weight, bias,
                                                  approximate == "tanh", int(partial_rows))
    return dx, dw.view(weight.shape).to(weight.dtype), db.to(weight.dtype)


def upsample_sum_fwd(maps, hws, size, bias, scale, shift, relu: bool) -> torch.Tensor:
    """maps[k] contiguous tokens (B, h_k*w_k, D) (at most 4), hws [(h_k, w_k)], size (H, W); bias,
    scale, shift (D,) or None -> tokens (B, H*W, D) in the maps' dtype."""
    if maps[0].numel() == 0:
        return maps[0].new_empty((maps[0].shape[0], size[0] * size[1], maps[0].shape[2]))
    return native(maps[0].device).upsample_sum_fwd(list(maps), [s for hw in hws for s in hw], size[0], size[1],
                                                   bias, scale, shift, bool(relu))


def upsample_sum_epilogue_bwd(grad, maps, hws, size, bias, scale, shift, relu: bool):
    """(dz fp32 (B, H*W, D), dbias, dscale, dshift fp32 (D,)): the epilogue's backward, the sum
    recomputed from the maps; the vectors are per-block partials added in a fixed order."""
    return tuple(native(maps[0].device).upsample_sum_epilogue_bwd(
        grad.contiguous(), list(maps), [s for hw in hws for s in hw], size[0], size[1], bias, scale, shift,
        bool(relu)))


def upsample_adjoint(dz: torch.Tensor, hw, size, dtype: torch.dtype) -> torch.Tensor:
    """Gradient (B, h*w, D) in ``dtype`` of a map (h, w) upsampled to ``size``, from dz (B, H*W, D):
    separable gathers along W then H (each element written once: deterministic)."""
    return native(dz.device).upsample_adjoint(dz.contiguous(), hw[0], hw[1], size[0], size[1], dtype)


def resize_argmax_fwd(logits, yi0, yi1, wy0, wy1, xi0, xi1, wx0, wx1, size, return_scores: bool):
    """logits (B, K, h, w) contiguous; the op's index/weight tables (ops/resize_argmax.axis_tables)
    -> (labels (B, H, W) int64, scores (B, H, W) fp32 or an empty (0,) tensor)."""
    return tuple(native(logits.device).resize_argmax_fwd(logits, yi0, yi1, wy0, wy1, xi0, xi1, wx0, wx1,
                                                         size[0], size[1], return_scores))
