// Launchers of the conv + LayerNorm kernels (csrc/cuda/conv_layernorm.cu): plain pointers, sizes and
// a stream, no torch. Shapes: x (B, Cin, H, W) read through 4D strides (an NCHW image, or the
// channels-last view of (B, H*W, Cin) tokens: sxc = 1); w (Cout, K) with k = (kh, kw, cin), cin
// fastest, K contiguous; bias, gamma, beta (Cout,) or null; out, dy, dz (B, Ho*Wo, Cout) contiguous
// tokens; Cout <= 512.
#pragma once

#include <cstdint>

#include "cuda/launch.h"
#include "cuda/sra_attention.h"  // sf_cuda::DType

namespace sf_cuda {

struct ConvLnParams {
  const void* x;       // (B, Cin, H, W) strides (sxb, sxc, sxh, sxw)
  const void* w;       // (Cout, K) contiguous, k = (kh * KW + kw) * Cin + cin
  const void* bias;    // (Cout,) or nullptr
  const void* gamma;   // (Cout,) or nullptr
  const void* beta;    // (Cout,) or nullptr (forward only)
  const void* dy;      // (B, Ho*Wo, Cout) contiguous, backward only
  void* out;           // forward: y; backward: dz; (B, Ho*Wo, Cout) contiguous, in the input dtype
  float* part;         // backward: (blocks, 3, Cout) fp32 workspace, rows [dbias, dgamma, dbeta]
  int64_t sxb, sxc, sxh, sxw;
  int B, Cin, H, W, Ho, Wo, Cout, KH, KW, stride_h, stride_w, pad_h, pad_w;
  float eps;
  // set by the launchers: 16-byte loads of 16 / sizeof(T) consecutive k where every address allows
  bool vec_x;          // sxc == 1, Cin, sxb, sxh, sxw multiples of the vector, x 16-byte aligned
  bool vec_w;          // K a multiple of the vector, w 16-byte aligned
};

// Number of blocks of the backward's dz kernel (the first dimension of p.part).
int conv_layernorm_blocks(DType dtype, int B, int Ho, int Wo, int Cout);

// Writes p.out (the LayerNorm'd conv output as tokens).
cudaError_t conv_layernorm_fwd(DType dtype, const ConvLnParams& p, cudaStream_t stream);

// Writes p.out (dz = d(conv output) as tokens, in dtype), the per-block partial sums p.part and
// their fixed-order sum dvec (3, Cout) fp32 = [dbias, dgamma, dbeta] (deterministic; no atomics).
cudaError_t conv_layernorm_bwd(DType dtype, const ConvLnParams& p, float* dvec, cudaStream_t stream);

}  // namespace sf_cuda
