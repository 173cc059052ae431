// Launcher of the fused post-processing kernel (csrc/cuda/resize_argmax.cu): bilinear resize of
// class logits + argmax over classes, labels (and winning scores) without full-resolution logits.
#pragma once

#include <cstdint>

#include "cuda/launch.h"
#include "cuda/sra_attention.h"  // sf_cuda::DType

namespace sf_cuda {

struct ResizeArgmaxParams {
  const void* logits;                  // (B, K, h, w) contiguous, in dtype
  const int* yi0; const int* yi1;      // (H,) source rows of each output row
  const float* wy0; const float* wy1;  // (H,) their weights
  const int* xi0; const int* xi1;      // (W,) source columns of each output column
  const float* wx0; const float* wx1;  // (W,) their weights
  int64_t* labels;                     // (B, H, W)
  float* scores;                       // (B, H, W) or nullptr
  int B, K, h, w, H, W;
};

cudaError_t resize_argmax_fwd(DType dtype, const ResizeArgmaxParams& p, cudaStream_t stream);

}  // namespace sf_cuda
