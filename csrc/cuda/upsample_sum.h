// Launchers of the folded SegFormer decoder's epilogue kernels (csrc/cuda/upsample_sum.cu): bilinear
// upsample (align_corners=False) of up to 4 token maps to (H, W), summed, + bias, * scale + shift,
// ReLU; its epilogue backward and the adjoint of the upsampling. Plain pointers, sizes and a stream.
#pragma once

#include <cstdint>

#include "cuda/launch.h"
#include "cuda/sra_attention.h"  // sf_cuda::DType

namespace sf_cuda {

constexpr int kUpsampleMaxMaps = 4;

struct UpsampleParams {
  const void* maps[kUpsampleMaxMaps];  // map k: (B, h[k]*w[k], D) contiguous tokens, in dtype
  int h[kUpsampleMaxMaps], w[kUpsampleMaxMaps];
  int n_maps;                          // 1 .. 4
  const float* bias;                   // (D,) fp32 or nullptr
  const float* scale;                  // (D,) fp32 or nullptr (folded eval BatchNorm)
  const float* shift;                  // (D,) fp32 or nullptr
  const void* grad;                    // (B, H*W, D) contiguous, in dtype: epilogue backward only
  void* out;                           // forward: (B, H*W, D) in dtype; epilogue backward: dz, fp32
  int B, H, W, D;
  bool relu;
};

// Number of partial rows of the epilogue backward (the first dimension of its workspace).
int upsample_sum_partial_rows(DType dtype, const UpsampleParams& p);

// Writes p.out = relu((sum_k up(map_k) + bias) * scale + shift), each term only where given.
cudaError_t upsample_sum_fwd(DType dtype, const UpsampleParams& p, cudaStream_t stream);

// Writes p.out = dz (fp32) = d out / d(sum of maps), the partial sums part (rows, 3, D) and their
// fixed-order sum dvec (3, D) fp32 = [dbias, dscale, dshift] (deterministic; no atomics).
cudaError_t upsample_sum_epilogue_bwd(DType dtype, const UpsampleParams& p, float* part, float* dvec,
                                      cudaStream_t stream);

// Adjoint of 1-D bilinear upsampling l_in -> l_out along the middle axis of contiguous
// (B, outer, l, inner) tensors: dx[b, o, i, :] = sum_l weight(l, i) * dz[b, o, l, :] (a gather:
// every element written once). dz in dtype_in, dx in dtype_out.
cudaError_t upsample_adjoint_1d(DType dtype_in, DType dtype_out, const void* dz, void* dx, int B, int outer,
                                int l_out, int l_in, int inner, cudaStream_t stream);

}  // namespace sf_cuda
