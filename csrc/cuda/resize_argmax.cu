// The fused post-processing in CUDA C++: the twin of segformer_fast/kernels/triton/resize_argmax.py
// (same arithmetic, bit for bit; see segformer_fast/ops/resize_argmax.py).
//
// One thread per output pixel (256-thread blocks over H*W, blockIdx.y = image): it reads its two
// source rows/columns and weights from the op's tables once, then loops over the K classes,
// gathering the 2x2 stencil of each class plane (neighbouring threads read neighbouring source
// pixels: L1/L2 hits), interpolating in fp32 with mul_rn/add_rn (no FMA contraction: the products
// and sums round as the tables rule says) and keeping the running maximum and its class in
// registers. A class replaces the best when its score is greater, or is NaN while the best is not.
// Writes one int64 label (and optionally one fp32 score) per pixel.
#include "cuda/pack.cuh"
#include "cuda/portable.cuh"
#include "cuda/resize_argmax.h"

namespace sf_cuda {
namespace resize_argmax {

constexpr int kThreads = 256;

template <class T>
SF_DEVICE float score(const T* plane, int o00, int o01, int o10, int o11, float lx0, float lx1, float ly0,
                      float ly1) {
  const float t0 = add_rn(mul_rn(lx0, sf_to_float(plane[o00])), mul_rn(lx1, sf_to_float(plane[o01])));
  const float t1 = add_rn(mul_rn(lx0, sf_to_float(plane[o10])), mul_rn(lx1, sf_to_float(plane[o11])));
  return add_rn(mul_rn(ly0, t0), mul_rn(ly1, t1));
}

template <class T>
__global__ void __launch_bounds__(kThreads) resize_argmax_kernel(const ResizeArgmaxParams p) {
  const int pix = blockIdx.x * kThreads + threadIdx.x, b = blockIdx.y;
  if (pix >= p.H * p.W) return;
  const int oy = pix / p.W, ox = pix % p.W;
  const int y0 = p.yi0[oy], y1 = p.yi1[oy], x0 = p.xi0[ox], x1 = p.xi1[ox];
  const float ly0 = p.wy0[oy], ly1 = p.wy1[oy], lx0 = p.wx0[ox], lx1 = p.wx1[ox];
  const int o00 = y0 * p.w + x0, o01 = y0 * p.w + x1, o10 = y1 * p.w + x0, o11 = y1 * p.w + x1;
  const int64_t plane = int64_t(p.h) * p.w;
  const T* base = static_cast<const T*>(p.logits) + int64_t(b) * p.K * plane;
  float best = score(base, o00, o01, o10, o11, lx0, lx1, ly0, ly1);
  int idx = 0;
  for (int k = 1; k < p.K; ++k) {
    const float v = score(base + k * plane, o00, o01, o10, o11, lx0, lx1, ly0, ly1);
    if (v > best || (v != v && best == best)) {
      best = v;
      idx = k;
    }
  }
  const int64_t out = int64_t(b) * p.H * p.W + pix;
  p.labels[out] = idx;
  if (p.scores != nullptr) p.scores[out] = best;
}

}  // namespace resize_argmax

cudaError_t resize_argmax_fwd(DType dtype, const ResizeArgmaxParams& p, cudaStream_t stream) {
  constexpr int threads = resize_argmax::kThreads;
  const dim3 grid((p.H * p.W + threads - 1) / threads, p.B);
  switch (dtype) {
    case DType::kFloat32:
      return SF_LAUNCH(resize_argmax::resize_argmax_kernel<float>, grid, dim3(threads), 0, stream, p);
    case DType::kFloat16:
      return SF_LAUNCH(resize_argmax::resize_argmax_kernel<sf_half>, grid, dim3(threads), 0, stream, p);
    default:
      return SF_LAUNCH(resize_argmax::resize_argmax_kernel<sf_bf16>, grid, dim3(threads), 0, stream, p);
  }
}

}  // namespace sf_cuda
