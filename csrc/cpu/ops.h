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
