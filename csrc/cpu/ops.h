// Native CPU kernels (raw pointers inside, torch::Tensor at the boundary). Registered with Python
// in csrc/bindings/cpu.cpp; built lazily by segformer_fast/_build.py.
#pragma once
#include <torch/extension.h>

#include <vector>

// segformer_fast.ops.upsample_sum, fp32/bf16 inference: maps[i] (B, h_i*w_i, D) contiguous, one
// dtype; hws the flattened (h_i, w_i) pairs; bias/scale/shift fp32; returns tokens (B, H*W, D).
torch::Tensor upsample_sum_forward(const std::vector<torch::Tensor>& maps, const std::vector<int64_t>& hws,
                                   int64_t H, int64_t W, const c10::optional<torch::Tensor>& bias,
                                   const c10::optional<torch::Tensor>& scale,
                                   const c10::optional<torch::Tensor>& shift, bool relu);

// The instruction set the kernels run with on this call: "avx512" or "portable" (cpu/isa.h).
const char* cpu_isa();

// segformer_fast.ops.resize_argmax, inference: logits (B, K, h, w) contiguous fp32/bf16/fp16; the
// op's index (int32) and weight (fp32) tables along H (H,) and W (W,) -> labels (B, H, W) int64 and
// the winning fp32 scores (B, H, W) (an empty tensor unless return_scores).
std::tuple<torch::Tensor, torch::Tensor> resize_argmax_forward(
    const torch::Tensor& logits, const torch::Tensor& yi0, const torch::Tensor& yi1, const torch::Tensor& wy0,
    const torch::Tensor& wy1, const torch::Tensor& xi0, const torch::Tensor& xi1, const torch::Tensor& wx0,
    const torch::Tensor& wx1, int64_t H, int64_t W, bool return_scores);

// segformer_fast.ops.sra_attention, bf16 inference on AVX512-BF16: q (B, N, C), k and v (B, M, C)
// bf16 with contiguous channels (any row stride), head dim C / num_heads a multiple of 32, <= 128;
// returns (B, N, C) bf16 contiguous.
torch::Tensor sra_attention_bf16_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                         int64_t num_heads, double scale);

// Whether sra_attention_bf16_forward can run here: the CPU has AVX512-BF16 and
// SEGFORMER_FAST_CPU_ISA is not "portable".
bool cpu_has_bf16_dot();
