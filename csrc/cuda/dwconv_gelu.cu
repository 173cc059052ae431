// Mix-FFN core in CUDA C++: depthwise 3x3 conv (stride 1, zero padding 1) + bias + GELU on tokens,
// the twin of segformer_fast/kernels/triton/dwconv_gelu.py (same math, same numerics contract).
//
// Layout: x, y, dy, dx are (B, N = H*W, C) tokens, i.e. the NCHW map's channels-last memory, read
// in place (no transposes). A block owns an 8x8 tile of pixels x CB = 8*V channels; its 256 threads
// are 8 channel vectors (V contiguous channels each: 16-byte loads when C and the pointers allow,
// else V = 1) x 32 pixel slots, every thread computing 2 pixels. Consecutive threads read
// consecutive vectors of one pixel: a warp reads 4 pixels x 128 contiguous bytes.
//
// Kernels (grid):
// - dwconv_fwd_kernel (tiles, C/CB, B): stages the tile's 10x10 input halo in shared memory (zeros
//   outside the map), the 9 taps and the bias of its channels as fp32; y = gelu(conv + b), fp32 math,
//   exact (erf) or tanh GELU. The pre-activation is not stored.
// - dwconv_bwd_kernel (rows, C/CB): one fused pass per tile, walking tiles t = blockIdx.x + i*rows:
//   stages x with a 2-pixel halo (12x12) and dy with a 1-pixel halo (10x10, as fp32), recomputes the
//   pre-activation on the 10x10 ring and turns dy into g = dy * gelu'(pre) in shared memory (g = 0
//   outside the map); then for its own pixels dx = sum_t w[t] * g[p - off_t] (the transposed stencil)
//   and the per-thread fp32 partials dw[t] += g[p] * x[p + off_t], db += g[p]. g never reaches memory.
//   At the end the partials of the block are reduced in a fixed order (warp butterfly, then the 8
//   warps in order) into one row of part (rows, 10, C).
// - dwconv_reduce_kernel (10*C/256): dw (C, 9) and db (C,) = the rows of part summed in order
//   r = 0, 1, ... (deterministic: no atomics anywhere).
#include <algorithm>
#include <cmath>

#include "cuda/dwconv_gelu.h"
#include "cuda/pack.cuh"
#include "cuda/portable.cuh"

namespace sf_cuda {
namespace dwconv {

constexpr int kThreads = 256;
constexpr int kGroups = 8;                        // channel vectors per block
constexpr int kSlots = kThreads / kGroups;        // pixel slots
constexpr int kTile = 8;                          // kTile x kTile output pixels per tile
constexpr int kPix = kTile * kTile / kSlots;      // pixels per thread
constexpr int kMaxRows = 256;                     // backward blocks along the tiles (partial rows)
constexpr unsigned kFull = 0xffffffffu;

constexpr float kSqrt1_2 = 0.7071067811865476f;      // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.3989422804014327f;   // 1/sqrt(2 pi)
constexpr float kK0 = 0.7978845608028654f;           // sqrt(2/pi), tanh form
constexpr float kK1 = 0.044715f;

SF_DEVICE float gelu(float z, bool tanh_form) {
  if (tanh_form) return 0.5f * z * (1.f + tanhf(kK0 * (z + kK1 * z * z * z)));
  return 0.5f * z * (1.f + erff(z * kSqrt1_2));
}

SF_DEVICE float gelu_grad(float z, bool tanh_form) {
  if (tanh_form) {
    const float t = tanhf(kK0 * (z + kK1 * z * z * z));
    return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * kK0 * (1.f + 3.f * kK1 * z * z);
  }
  return 0.5f * (1.f + erff(z * kSqrt1_2)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
}

// The (kTile + 2R)^2 pixels around the tile whose top-left output pixel is (h0, w0), channels
// [c0, c0 + 8V) of one image x (H*W, C) -> s (pixels, 8V) in shared memory, pixel-major, as S (T or
// fp32); zeros outside the map and past C.
template <class T, class S, int V, int R>
SF_DEVICE void stage_halo(S* __restrict__ s, const T* __restrict__ x, int h0, int w0, int H, int W, int C,
                          int c0) {
  constexpr int E = kTile + 2 * R, CB = kGroups * V;
  for (int i = threadIdx.x; i < E * E * kGroups; i += kThreads) {
    const int pix = i / kGroups, grp = i % kGroups;
    const int hh = h0 - R + pix / E, ww = w0 - R + pix % E, c = c0 + grp * V;
    const bool inside = hh >= 0 && hh < H && ww >= 0 && ww < W && c < C;
    Pack<T, V> val;
    if (inside) {
      val = ld_pack<T, V>(x + (int64_t(hh) * W + ww) * C + c);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) val.v[v] = sf_from_float<T>(0.f);
    }
    S* dst = s + pix * CB + grp * V;
    if constexpr (std::is_same<S, T>::value) {
      st_pack<T, V>(dst, val);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) dst[v] = sf_to_float(val.v[v]);
    }
  }
}

// sw (10, CB) fp32: rows 0..8 the taps of channels c0 .. c0 + CB, row 9 the bias (0 without one).
template <class T>
SF_DEVICE void stage_weights(float* __restrict__ sw, const T* __restrict__ w, const T* __restrict__ bias, int C,
                             int c0, int CB) {
  for (int i = threadIdx.x; i < 10 * CB; i += kThreads) {
    const int t = i / CB, c = c0 + i % CB;
    float val = 0.f;
    if (c < C) val = t < 9 ? sf_to_float(w[c * 9 + t]) : (bias ? sf_to_float(bias[c]) : 0.f);
    sw[i] = val;
  }
}

// ------------------------------------------------------------------------------------ forward
template <class T, int V>
__global__ void __launch_bounds__(kThreads, 4) dwconv_fwd_kernel(const DwconvParams p) {
  constexpr int CB = kGroups * V, E = kTile + 2;
  SF_DYNAMIC_SMEM(smem);
  T* sx = reinterpret_cast<T*>(smem);                   // (E*E, CB) input halo
  float* sw = reinterpret_cast<float*>(sx + E * E * CB);  // (10, CB) taps + bias, fp32

  const int tiles_w = (p.W + kTile - 1) / kTile;
  const int h0 = blockIdx.x / tiles_w * kTile, w0 = blockIdx.x % tiles_w * kTile;
  const int c0 = blockIdx.y * CB, b = blockIdx.z;
  const int64_t image = int64_t(b) * p.H * p.W * p.C;
  stage_halo<T, T, V, 1>(sx, static_cast<const T*>(p.x) + image, h0, w0, p.H, p.W, p.C, c0);
  stage_weights(sw, static_cast<const T*>(p.w), static_cast<const T*>(p.bias), p.C, c0, CB);
  __syncthreads();  // halo and weights complete before any thread reads them

  const int grp = threadIdx.x % kGroups, slot = threadIdx.x / kGroups, c = c0 + grp * V;
  if (c >= p.C) return;
  T* y = static_cast<T*>(p.out) + image + c;
#pragma unroll
  for (int r = 0; r < kPix; ++r) {
    const int pix = slot + r * kSlots, ph = pix / kTile, pw = pix % kTile;
    if (h0 + ph >= p.H || w0 + pw >= p.W) continue;
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = sw[9 * CB + grp * V + v];
#pragma unroll
    for (int kh = 0; kh < 3; ++kh)
#pragma unroll
      for (int kw = 0; kw < 3; ++kw) {
        const Pack<T, V> xv = ld_pack<T, V>(sx + ((ph + kh) * E + pw + kw) * CB + grp * V);
        const float* wt = sw + (kh * 3 + kw) * CB + grp * V;
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = fmaf(sf_to_float(xv.v[v]), wt[v], acc[v]);
      }
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = gelu(acc[v], p.tanh);
    st_float<T, V>(y + (int64_t(h0 + ph) * p.W + w0 + pw) * p.C, acc);
  }
}

// ------------------------------------------------------------------------------------ backward
template <class T, int V>
__global__ void __launch_bounds__(kThreads) dwconv_bwd_kernel(const DwconvParams p, float* __restrict__ part,
                                                             int tiles) {
  constexpr int CB = kGroups * V, EX = kTile + 4, EG = kTile + 2;
  SF_DYNAMIC_SMEM(smem);
  T* sx = reinterpret_cast<T*>(smem);                         // (EX*EX, CB) x with a 2-pixel halo
  float* sg = reinterpret_cast<float*>(sx + EX * EX * CB);    // (EG*EG, CB) dy, then g = dy * gelu'(pre)
  float* sw = sg + EG * EG * CB;                              // (10, CB) taps + bias, fp32
  float* red = sg;                                            // (8 warps, 10, CB) after the last tile

  const int tiles_w = (p.W + kTile - 1) / kTile, tiles_img = tiles_w * ((p.H + kTile - 1) / kTile);
  const int c0 = blockIdx.y * CB;
  const int grp = threadIdx.x % kGroups, slot = threadIdx.x / kGroups, c = c0 + grp * V;
  stage_weights(sw, static_cast<const T*>(p.w), static_cast<const T*>(p.bias), p.C, c0, CB);

  float dw[10][V] = {};  // this thread's partials: 9 taps of dw, then db
  for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int b = t / tiles_img, h0 = t % tiles_img / tiles_w * kTile, w0 = t % tiles_w * kTile;
    const int64_t image = int64_t(b) * p.H * p.W * p.C;
    __syncthreads();  // every thread is done with the previous tile's sx and sg
    stage_halo<T, T, V, 2>(sx, static_cast<const T*>(p.x) + image, h0, w0, p.H, p.W, p.C, c0);
    stage_halo<T, float, V, 1>(sg, static_cast<const T*>(p.dy) + image, h0, w0, p.H, p.W, p.C, c0);
    __syncthreads();  // x, dy (and the weights) complete before any thread reads them

    // g = dy * gelu'(conv(x) + b) on the 10x10 ring (outside the map dy was staged as 0: g = 0)
    for (int i = threadIdx.x; i < EG * EG * kGroups; i += kThreads) {
      const int pix = i / kGroups, gi = i % kGroups, ph = pix / EG, pw = pix % EG;
      const int hh = h0 - 1 + ph, ww = w0 - 1 + pw;
      if (hh < 0 || hh >= p.H || ww < 0 || ww >= p.W || c0 + gi * V >= p.C) continue;
      float pre[V];
#pragma unroll
      for (int v = 0; v < V; ++v) pre[v] = sw[9 * CB + gi * V + v];
#pragma unroll
      for (int kh = 0; kh < 3; ++kh)
#pragma unroll
        for (int kw = 0; kw < 3; ++kw) {
          // ring pixel (ph, pw) sits at (ph + 1, pw + 1) of the 12x12 frame; tap offset (kh - 1, kw - 1)
          const Pack<T, V> xv = ld_pack<T, V>(sx + ((ph + kh) * EX + pw + kw) * CB + gi * V);
          const float* wt = sw + (kh * 3 + kw) * CB + gi * V;
#pragma unroll
          for (int v = 0; v < V; ++v) pre[v] = fmaf(sf_to_float(xv.v[v]), wt[v], pre[v]);
        }
      float* gp = sg + pix * CB + gi * V;
#pragma unroll
      for (int v = 0; v < V; ++v) gp[v] *= gelu_grad(pre[v], p.tanh);
    }
    __syncthreads();  // g of the whole ring complete before the stencils read it

    if (c < p.C) {
      T* dx = static_cast<T*>(p.out) + image + c;
#pragma unroll
      for (int r = 0; r < kPix; ++r) {
        const int pix = slot + r * kSlots, ph = pix / kTile, pw = pix % kTile;
        if (h0 + ph >= p.H || w0 + pw >= p.W) continue;
        const float* gown = sg + ((ph + 1) * EG + pw + 1) * CB + grp * V;
        float acc[V] = {};
#pragma unroll
        for (int kh = 0; kh < 3; ++kh)
#pragma unroll
          for (int kw = 0; kw < 3; ++kw) {
            const int tap = kh * 3 + kw;
            const float* gs = sg + ((ph + 2 - kh) * EG + pw + 2 - kw) * CB + grp * V;    // g[p - off_t]
            const Pack<T, V> xs = ld_pack<T, V>(sx + ((ph + 1 + kh) * EX + pw + 1 + kw) * CB + grp * V);  // x[p + off_t]
            const float* wt = sw + tap * CB + grp * V;
#pragma unroll
            for (int v = 0; v < V; ++v) {
              acc[v] = fmaf(wt[v], gs[v], acc[v]);
              dw[tap][v] = fmaf(gown[v], sf_to_float(xs.v[v]), dw[tap][v]);
            }
          }
#pragma unroll
        for (int v = 0; v < V; ++v) dw[9][v] += gown[v];
        st_float<T, V>(dx + (int64_t(h0 + ph) * p.W + w0 + pw) * p.C, acc);
      }
    }
  }

  // the 4 pixel slots of a channel vector in a warp are lanes grp, grp + 8, grp + 16, grp + 24
#pragma unroll
  for (int t = 0; t < 10; ++t)
#pragma unroll
    for (int v = 0; v < V; ++v) {
      dw[t][v] += __shfl_xor_sync(kFull, dw[t][v], 8);
      dw[t][v] += __shfl_xor_sync(kFull, dw[t][v], 16);
    }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // every thread is done reading sg, which red overwrites
  if (lane < kGroups) {
#pragma unroll
    for (int t = 0; t < 10; ++t)
#pragma unroll
      for (int v = 0; v < V; ++v) red[(warp * 10 + t) * CB + lane * V + v] = dw[t][v];
  }
  __syncthreads();  // every warp's sums are in red
  for (int i = threadIdx.x; i < 10 * CB; i += kThreads) {
    const int t = i / CB, cc = c0 + i % CB;
    if (cc >= p.C) continue;
    float s = 0.f;
    for (int w8 = 0; w8 < kThreads / 32; ++w8) s += red[(w8 * 10 + t) * CB + i % CB];
    part[(int64_t(blockIdx.x) * 10 + t) * p.C + cc] = s;
  }
}

// dw (C, 9), db (C,) fp32: the `rows` rows of part (rows, 10, C) summed in order
__global__ void __launch_bounds__(256) dwconv_reduce_kernel(const float* __restrict__ part, float* __restrict__ dw,
                                                            float* __restrict__ db, int rows, int C) {
  const int i = blockIdx.x * 256 + threadIdx.x;
  if (i >= 10 * C) return;
  float s = 0.f;
  for (int r = 0; r < rows; ++r) s += part[int64_t(r) * 10 * C + i];
  const int t = i / C, c = i % C;
  if (t < 9) dw[c * 9 + t] = s;
  else db[c] = s;
}

// ------------------------------------------------------------------------------------ launchers
int cdiv(int64_t a, int64_t b) { return int((a + b - 1) / b); }

int tiles_of(const DwconvParams& p) { return cdiv(p.H, kTile) * cdiv(p.W, kTile) * p.B; }

// V contiguous channels per thread: 16-byte vectors when C and every token pointer allow, else 1
template <class T>
bool vector_ok(const DwconvParams& p) {
  constexpr int V = 16 / sizeof(T);
  auto aligned = [](const void* q) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return p.C % V == 0 && aligned(p.x) && aligned(p.dy) && aligned(p.out);
}

template <class T, int V>
cudaError_t fwd(const DwconvParams& p, cudaStream_t stream) {
  constexpr int CB = kGroups * V;
  const size_t smem = (kTile + 2) * (kTile + 2) * CB * sizeof(T) + 10 * CB * sizeof(float);
  const dim3 grid(cdiv(p.H, kTile) * cdiv(p.W, kTile), cdiv(p.C, CB), p.B);
  void (*kernel)(DwconvParams) = dwconv_fwd_kernel<T, V>;
  return SF_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p);
}

template <class T, int V>
cudaError_t bwd(const DwconvParams& p, float* part, int rows, float* dw, float* db, cudaStream_t stream) {
  constexpr int CB = kGroups * V;
  // <= 46.6 KB (fp16/bf16, CB = 64): no opt-in beyond the default 48 KB needed
  const size_t smem = (kTile + 4) * (kTile + 4) * CB * sizeof(T) + ((kTile + 2) * (kTile + 2) + 10) * CB * sizeof(float);
  void (*kernel)(DwconvParams, float*, int) = dwconv_bwd_kernel<T, V>;
  const cudaError_t e = SF_LAUNCH(kernel, dim3(rows, cdiv(p.C, CB)), dim3(kThreads), smem, stream, p, part, tiles_of(p));
  if (e != cudaSuccess) return e;
  return SF_LAUNCH(dwconv_reduce_kernel, dim3(cdiv(10 * p.C, 256)), dim3(256), 0, stream,
                   static_cast<const float*>(part), dw, db, rows, p.C);
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

bool valid(const DwconvParams& p) { return p.B >= 1 && p.H >= 1 && p.W >= 1 && p.C >= 1; }

}  // namespace dwconv

int dwconv_gelu_partial_rows(int B, int H, int W) {
  namespace d = dwconv;
  return std::max(1, std::min(d::cdiv(H, d::kTile) * d::cdiv(W, d::kTile) * B, d::kMaxRows));
}

cudaError_t dwconv_gelu_fwd(DType dtype, const DwconvParams& p, cudaStream_t stream) {
  namespace d = dwconv;
  if (!d::valid(p)) return cudaErrorInvalidValue;
  return d::by_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    return d::vector_ok<T>(p) ? d::fwd<T, 16 / sizeof(T)>(p, stream) : d::fwd<T, 1>(p, stream);
  });
}

cudaError_t dwconv_gelu_bwd(DType dtype, const DwconvParams& p, float* part, int rows, float* dw, float* db,
                            cudaStream_t stream) {
  namespace d = dwconv;
  if (!d::valid(p) || rows < 1) return cudaErrorInvalidValue;
  return d::by_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    return d::vector_ok<T>(p) ? d::bwd<T, 16 / sizeof(T)>(p, part, rows, dw, db, stream)
                              : d::bwd<T, 1>(p, part, rows, dw, db, stream);
  });
}

}  // namespace sf_cuda
