// The folded SegFormer decoder's epilogue in CUDA C++: the twin of
// segformer_fast/kernels/triton/upsample_sum.py (same math, same numerics contract).
//
// Layout: every tensor is tokens (B, pixels, D) with channels contiguous. A block is 256 threads =
// `tpx` lanes along D (V contiguous channels each: 16-byte vectors when D and the pointers allow,
// else V = 1; tpx the smallest power of two covering D / V, at most 32) x 256 / tpx pixel slots,
// each slot handling kReps pixels.
//
// Index math (F.interpolate, bilinear, align_corners=False), in fp32 without FMA contraction so it
// rounds as PyTorch's CPU code does: scale = in / out (an fp32 quotient, computed on the host),
// src = max((dst + 0.5) * scale - 0.5, 0), i0 = min(floor(src), in - 1), i1 = i0 + (i0 < in - 1),
// lambda = clamp(src - i0, 0, 1).
//
// Kernels (grid):
// - upsample_sum_fwd_kernel (pixel tiles, D chunks, B): every output pixel gathers the 2x2 stencil of
//   each low-resolution map (a map already at (H, W) is read directly), sums in fp32, then + bias,
//   * scale, + shift, ReLU, and writes once. No intermediates, no shared memory: the small maps are
//   re-read from L1/L2.
// - upsample_epilogue_bwd_kernel (same grid; only when scale/shift/ReLU are given): recomputes the
//   sum, writes dz = d out / d sum in fp32 and the block's partials of dbias = sum dz,
//   dscale = sum g * z, dshift = sum g (g the ReLU-masked incoming gradient), reduced in a fixed
//   order (slots in order, through shared memory) into one row of part (rows, 3, D);
//   upsample_reduce_kernel sums the rows in order (deterministic, no atomics).
// - upsample_adjoint_kernel (outer*l_in / slots, inner chunks, B): the adjoint of 1-D upsampling as a
//   gather: low-res index i visits the K output indices whose stencil can touch it (K from the host,
//   one index of slack each side) and accumulates weight * dz with the weight recomputed by the
//   forward's index math (0 outside the true stencil: not even loaded). Run along W, then along H
//   (bilinear weights are a product), as the Triton launcher does.
#include <algorithm>
#include <cmath>

#include "cuda/pack.cuh"
#include "cuda/portable.cuh"
#include "cuda/upsample_sum.h"

namespace sf_cuda {
namespace upsample {

constexpr int kThreads = 256;
constexpr int kReps = 4;  // pixels per slot per block

struct Scales {
  float sh[kUpsampleMaxMaps], sw[kUpsampleMaxMaps];  // h_k / H and w_k / W, fp32 quotients
  int tpx;                                           // lanes per pixel
};

SF_DEVICE int imin(int a, int b) { return a < b ? a : b; }
SF_DEVICE int imax(int a, int b) { return a > b ? a : b; }

// (i0, i1, lambda1) of output index dst for an input of n_in (align_corners=False)
SF_DEVICE void src_index(int dst, float scale, int n_in, int& i0, int& i1, float& lam) {
  const float src = fmaxf(add_rn(mul_rn(add_rn(float(dst), 0.5f), scale), -0.5f), 0.f);
  i0 = imin(int(src), n_in - 1);  // src >= 0: truncation is floor
  lam = fminf(fmaxf(src - float(i0), 0.f), 1.f);
  i1 = i0 + (i0 < n_in - 1 ? 1 : 0);
}

// z[V] = sum over the maps of the (upsampled) value at output pixel (oh, ow), channels c .. c + V
template <class T, int V>
SF_DEVICE void gather_sum(float (&z)[V], const UpsampleParams& p, const Scales& s, int b, int oh, int ow, int c) {
#pragma unroll
  for (int v = 0; v < V; ++v) z[v] = 0.f;
#pragma unroll
  for (int k = 0; k < kUpsampleMaxMaps; ++k) {
    if (k >= p.n_maps) break;
    const int h = p.h[k], w = p.w[k];
    const T* m = static_cast<const T*>(p.maps[k]) + int64_t(b) * h * w * p.D + c;
    if (h == p.H && w == p.W) {
      float val[V];
      ld_float<T, V>(val, m + (int64_t(oh) * w + ow) * p.D);
#pragma unroll
      for (int v = 0; v < V; ++v) z[v] += val[v];
      continue;
    }
    int y0, y1, x0, x1;
    float ly, lx;
    src_index(oh, s.sh[k], h, y0, y1, ly);
    src_index(ow, s.sw[k], w, x0, x1, lx);
    float v00[V], v01[V], v10[V], v11[V];
    ld_float<T, V>(v00, m + (int64_t(y0) * w + x0) * p.D);
    ld_float<T, V>(v01, m + (int64_t(y0) * w + x1) * p.D);
    ld_float<T, V>(v10, m + (int64_t(y1) * w + x0) * p.D);
    ld_float<T, V>(v11, m + (int64_t(y1) * w + x1) * p.D);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      // PyTorch's association: h0l * (w0l * v00 + w1l * v01) + h1l * (w0l * v10 + w1l * v11)
      const float top = (1.f - lx) * v00[v] + lx * v01[v];
      const float bot = (1.f - lx) * v10[v] + lx * v11[v];
      z[v] += (1.f - ly) * top + ly * bot;
    }
  }
  if (p.bias) {
#pragma unroll
    for (int v = 0; v < V; ++v) z[v] += p.bias[c + v];
  }
}

// ------------------------------------------------------------------------------------ forward
template <class T, int V>
__global__ void __launch_bounds__(kThreads) upsample_sum_fwd_kernel(const UpsampleParams p, const Scales s) {
  const int lane = threadIdx.x % s.tpx, slot = threadIdx.x / s.tpx, slots = kThreads / s.tpx;
  const int c = (blockIdx.y * s.tpx + lane) * V, b = blockIdx.z, HW = p.H * p.W;
  if (c >= p.D) return;
  T* out = static_cast<T*>(p.out) + int64_t(b) * HW * p.D + c;
  for (int r = 0; r < kReps; ++r) {
    const int pix = (blockIdx.x * kReps + r) * slots + slot;
    if (pix >= HW) break;
    float z[V];
    gather_sum<T, V>(z, p, s, b, pix / p.W, pix % p.W, c);
#pragma unroll
    for (int v = 0; v < V; ++v) {  // in the reference's order: + bias (above), * scale, + shift, ReLU
      if (p.scale) z[v] *= p.scale[c + v];
      if (p.shift) z[v] += p.shift[c + v];
      if (p.relu) z[v] = fmaxf(z[v], 0.f);
    }
    st_float<T, V>(out + int64_t(pix) * p.D, z);
  }
}

// ------------------------------------------------------------------------------------ backward
template <class T, int V>
__global__ void __launch_bounds__(kThreads) upsample_epilogue_bwd_kernel(const UpsampleParams p, const Scales s,
                                                                         float* __restrict__ part) {
  SF_DYNAMIC_SMEM(smem);
  float* red = reinterpret_cast<float*>(smem);  // (3, slots, tpx * V) per-thread partial sums
  const int tpx = s.tpx, lane = threadIdx.x % tpx, slot = threadIdx.x / tpx, slots = kThreads / tpx;
  const int c = (blockIdx.y * tpx + lane) * V, b = blockIdx.z, HW = p.H * p.W;
  float acc[3][V] = {};  // dbias, dscale, dshift
  if (c < p.D) {
    const T* g_in = static_cast<const T*>(p.grad) + int64_t(b) * HW * p.D + c;
    float* dz = static_cast<float*>(p.out) + int64_t(b) * HW * p.D + c;
    for (int r = 0; r < kReps; ++r) {
      const int pix = (blockIdx.x * kReps + r) * slots + slot;
      if (pix >= HW) break;
      float z[V], g[V];
      gather_sum<T, V>(z, p, s, b, pix / p.W, pix % p.W, c);
      ld_float<T, V>(g, g_in + int64_t(pix) * p.D);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float sc = p.scale ? p.scale[c + v] : 1.f;
        float u = p.scale ? z[v] * sc : z[v];
        if (p.shift) u += p.shift[c + v];
        if (p.relu && !(u > 0.f)) g[v] = 0.f;  // threshold_backward: gradient only where out > 0
        const float d = p.scale ? g[v] * sc : g[v];
        acc[0][v] += d;
        acc[1][v] = fmaf(g[v], z[v], acc[1][v]);
        acc[2][v] += g[v];
        z[v] = d;
      }
      st_float<float, V>(dz + int64_t(pix) * p.D, z);
    }
  }
  const int width = tpx * V;
#pragma unroll
  for (int q = 0; q < 3; ++q)
#pragma unroll
    for (int v = 0; v < V; ++v) red[(q * slots + slot) * width + lane * V + v] = acc[q][v];
  __syncthreads();  // every slot's partials are in red
  const int row = b * gridDim.x + blockIdx.x;
  for (int i = threadIdx.x; i < 3 * width; i += kThreads) {
    const int q = i / width, j = i % width, cc = blockIdx.y * width + j;
    if (cc >= p.D) continue;
    float sum = 0.f;
    for (int sl = 0; sl < slots; ++sl) sum += red[(q * slots + sl) * width + j];
    part[(int64_t(row) * 3 + q) * p.D + cc] = sum;
  }
}

// dvec (3, D) = the `rows` rows of part (rows, 3, D) summed in order
__global__ void __launch_bounds__(256) upsample_reduce_kernel(const float* __restrict__ part, float* __restrict__ dvec,
                                                              int rows, int n) {
  const int i = blockIdx.x * 256 + threadIdx.x;
  if (i >= n) return;
  float sum = 0.f;
  for (int r = 0; r < rows; ++r) sum += part[int64_t(r) * n + i];
  dvec[i] = sum;
}

struct AdjointParams {
  int outer, l_out, l_in, inner;
  int K;            // gather window (host: window())
  int tpx;          // lanes along inner
  float scale;      // l_in / l_out, fp32 quotient (the forward's scale)
  float inv_scale;  // l_out / l_in
};

// weight with which output index o reads input index i along one axis (0 if it does not)
SF_DEVICE float axis_weight(int o, int i, float scale, int n_in) {
  int i0, i1;
  float lam;
  src_index(o, scale, n_in, i0, i1, lam);
  return (i0 == i ? 1.f - lam : 0.f) + (i1 == i ? lam : 0.f);
}

template <class Ti, class To, int V>
__global__ void __launch_bounds__(kThreads) upsample_adjoint_kernel(To* __restrict__ dx, const Ti* __restrict__ dz,
                                                                    const AdjointParams a) {
  // dx (B, outer, l_in, inner), dz (B, outer, l_out, inner), contiguous
  const int lane = threadIdx.x % a.tpx, slot = threadIdx.x / a.tpx, slots = kThreads / a.tpx;
  const int q = blockIdx.x * slots + slot, c = (blockIdx.y * a.tpx + lane) * V, b = blockIdx.z;
  if (q >= a.outer * a.l_in || c >= a.inner) return;
  const int o = q / a.l_in, i = q % a.l_in;
  // first output index that can read i: src(l) >= i - 1  <=>  l >= (i - 0.5) * out/in - 0.5 (one of slack)
  const int lo = imax(int((float(i) - 0.5f) * a.inv_scale - 0.5f) - 1, 0);
  const Ti* rows = dz + (int64_t(b) * a.outer + o) * a.l_out * a.inner + c;
  float acc[V] = {};
  for (int k = 0; k < a.K; ++k) {
    const int l = lo + k;
    if (l >= a.l_out) break;
    const float wgt = axis_weight(l, i, a.scale, a.l_in);
    if (wgt == 0.f) continue;  // outside the stencil: not even loaded
    float val[V];
    ld_float<Ti, V>(val, rows + int64_t(l) * a.inner);
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = fmaf(wgt, val[v], acc[v]);
  }
  st_float<To, V>(dx + (int64_t(b) * a.outer * a.l_in + q) * a.inner + c, acc);
}

// ------------------------------------------------------------------------------------ launchers
int cdiv(int64_t a, int64_t b) { return int((a + b - 1) / b); }

bool aligned(const void* q, size_t bytes) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % bytes == 0; }

int lanes_for(int n) {  // smallest power of two >= n, at most 32
  int t = 1;
  while (t < n && t < 32) t *= 2;
  return t;
}

float ratio(int n_in, int n_out) { return float(n_in) / float(n_out); }  // one IEEE fp32 division

template <class T>
int vector_width(const UpsampleParams& p, bool fp32_out) {
  constexpr int V = 16 / sizeof(T);
  bool ok = p.D % V == 0 && aligned(p.grad, 16) && aligned(p.out, fp32_out ? V * 4 : 16);
  for (int k = 0; k < p.n_maps; ++k) ok = ok && aligned(p.maps[k], 16);
  return ok ? V : 1;
}

Scales scales_of(const UpsampleParams& p, int V) {
  Scales s{};
  for (int k = 0; k < kUpsampleMaxMaps; ++k) {
    s.sh[k] = k < p.n_maps ? ratio(p.h[k], p.H) : 1.f;
    s.sw[k] = k < p.n_maps ? ratio(p.w[k], p.W) : 1.f;
  }
  s.tpx = lanes_for(cdiv(p.D, V));
  return s;
}

dim3 grid_of(const UpsampleParams& p, const Scales& s, int V) {
  return dim3(cdiv(int64_t(p.H) * p.W, kReps * (kThreads / s.tpx)), cdiv(p.D, s.tpx * V), p.B);
}

template <class T, int V>
cudaError_t fwd(const UpsampleParams& p, cudaStream_t stream) {
  const Scales s = scales_of(p, V);
  void (*kernel)(UpsampleParams, Scales) = upsample_sum_fwd_kernel<T, V>;
  return SF_LAUNCH(kernel, grid_of(p, s, V), dim3(kThreads), 0, stream, p, s);
}

template <class T, int V>
cudaError_t epilogue_bwd(const UpsampleParams& p, float* part, float* dvec, cudaStream_t stream) {
  const Scales s = scales_of(p, V);
  const dim3 grid = grid_of(p, s, V);
  void (*kernel)(UpsampleParams, Scales, float*) = upsample_epilogue_bwd_kernel<T, V>;
  const size_t smem = 3 * kThreads * V * sizeof(float);  // <= 24 KB
  cudaError_t e = SF_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p, s, part);
  if (e != cudaSuccess) return e;
  return SF_LAUNCH(upsample_reduce_kernel, dim3(cdiv(3 * p.D, 256)), dim3(256), 0, stream,
                   static_cast<const float*>(part), dvec, int(grid.x * grid.z), 3 * p.D);
}

// Loop length of the adjoint's gather (the Triton launcher's window()): the widest range of output
// indices between the kernel's start (one index of slack) and the true stencil's end (plus one),
// plus one more for fp32-vs-fp64 rounding of the start.
int window(int n_in, int n_out) {
  const double inv = double(n_out) / n_in;
  int widest = 0;
  for (int i = 0; i < n_in; ++i) {
    const int lo = std::max(int(std::floor((i - 0.5) * inv - 0.5)) - 1, 0);
    const int hi = std::min(n_out, int(std::floor((i + 1.5) * inv - 0.5)) + 2);
    widest = std::max(widest, hi - lo);
  }
  return widest + 1;
}

template <class Ti, class To, int V>
cudaError_t adjoint(const void* dz, void* dx, int B, const AdjointParams& a, cudaStream_t stream) {
  void (*kernel)(To*, const Ti*, AdjointParams) = upsample_adjoint_kernel<Ti, To, V>;
  const dim3 grid(cdiv(int64_t(a.outer) * a.l_in, kThreads / a.tpx), cdiv(a.inner, a.tpx * V), B);
  return SF_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, static_cast<To*>(dx), static_cast<const Ti*>(dz), a);
}

template <class F>
cudaError_t by_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(sf_half{});
    case DType::kBFloat16: return f(sf_bf16{});
  }
  return cudaErrorInvalidValue;
}

bool valid(const UpsampleParams& p) {
  if (p.n_maps < 1 || p.n_maps > kUpsampleMaxMaps || p.B < 1 || p.H < 1 || p.W < 1 || p.D < 1) return false;
  for (int k = 0; k < p.n_maps; ++k)
    if (p.h[k] < 1 || p.w[k] < 1) return false;
  return true;
}

}  // namespace upsample

int upsample_sum_partial_rows(DType dtype, const UpsampleParams& p) {
  namespace u = upsample;
  int rows = 0;
  u::by_type(dtype, [&](auto zero) {
    const int V = u::vector_width<decltype(zero)>(p, true);
    rows = int(u::grid_of(p, u::scales_of(p, V), V).x) * p.B;
    return cudaSuccess;
  });
  return rows;
}

cudaError_t upsample_sum_fwd(DType dtype, const UpsampleParams& p, cudaStream_t stream) {
  namespace u = upsample;
  if (!u::valid(p)) return cudaErrorInvalidValue;
  return u::by_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = 16 / sizeof(T);
    return u::vector_width<T>(p, false) == V ? u::fwd<T, V>(p, stream) : u::fwd<T, 1>(p, stream);
  });
}

cudaError_t upsample_sum_epilogue_bwd(DType dtype, const UpsampleParams& p, float* part, float* dvec,
                                      cudaStream_t stream) {
  namespace u = upsample;
  if (!u::valid(p)) return cudaErrorInvalidValue;
  return u::by_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = 16 / sizeof(T);
    return u::vector_width<T>(p, true) == V ? u::epilogue_bwd<T, V>(p, part, dvec, stream)
                                            : u::epilogue_bwd<T, 1>(p, part, dvec, stream);
  });
}

cudaError_t upsample_adjoint_1d(DType dtype_in, DType dtype_out, const void* dz, void* dx, int B, int outer,
                                int l_out, int l_in, int inner, cudaStream_t stream) {
  namespace u = upsample;
  if (B < 1 || outer < 1 || l_out < 1 || l_in < 1 || inner < 1) return cudaErrorInvalidValue;
  return u::by_type(dtype_in, [&](auto zin) {
    return u::by_type(dtype_out, [&](auto zout) {
      using Ti = decltype(zin);
      using To = decltype(zout);
      const bool vec = inner % 4 == 0 && u::aligned(dz, 4 * sizeof(Ti)) && u::aligned(dx, 4 * sizeof(To));
      u::AdjointParams a{outer, l_out, l_in, inner, u::window(l_in, l_out), 0, u::ratio(l_in, l_out),
                         float(double(l_out) / l_in)};
      a.tpx = u::lanes_for(u::cdiv(inner, vec ? 4 : 1));
      return vec ? u::adjoint<Ti, To, 4>(dz, dx, B, a, stream) : u::adjoint<Ti, To, 1>(dz, dx, B, a, stream);
    });
  });
}

}  // namespace sf_cuda
