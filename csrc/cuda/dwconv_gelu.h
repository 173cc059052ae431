// Launchers of the Mix-FFN core kernels (csrc/cuda/dwconv_gelu.cu): depthwise 3x3 conv (stride 1,
// zero padding 1) + bias + GELU on (B, N = H*W, C) tokens, forward and backward. Plain pointers,
// sizes and a stream, no torch.
#pragma once

#include <cstdint>

#include "cuda/launch.h"
#include "cuda/sra_attention.h"  // sf_cuda::DType

namespace sf_cuda {

struct DwconvParams {
  const void* x;     // (B, H*W, C) contiguous tokens (channels-last: the NCHW map's memory)
  const void* w;     // (C, 1, 3, 3) contiguous: tap (kh, kw) of channel c at c*9 + kh*3 + kw
  const void* bias;  // (C,) or nullptr
  const void* dy;    // (B, H*W, C) contiguous, backward only
  void* out;         // forward: y; backward: dx; (B, H*W, C) contiguous, in the input dtype
  int B, H, W, C;
  bool tanh;         // GELU form: false = exact (erf), true = tanh approximation
};

// Default number of backward blocks along the tiles (the first dimension of the partial sums).
int dwconv_gelu_partial_rows(int B, int H, int W);

// Writes p.out = gelu(dwconv3x3(x) + bias).
cudaError_t dwconv_gelu_fwd(DType dtype, const DwconvParams& p, cudaStream_t stream);

// Writes p.out = dx, the per-block fp32 partial sums part (rows, 10, C) (9 taps of dw, then db) and
// their fixed-order sum: dw (C, 9) and db (C,) in fp32 (deterministic; no atomics). `rows` blocks
// walk the B * ceil(H/8) * ceil(W/8) tiles with a fixed stride.
cudaError_t dwconv_gelu_bwd(DType dtype, const DwconvParams& p, float* part, int rows, float* dw, float* db,
                            cudaStream_t stream);

}  // namespace sf_cuda
