// Strided conv + LayerNorm over output channels, tokens out, in CUDA C++: the twin of
// segformer_fast/kernels/triton/conv_layernorm.py (same math, same numerics contract). Serves the
// overlapping patch embeddings (k7 s4 p3, k3 s2 p1) and the sequence reduction (k = s = sr, p = 0).
//
// Implicit GEMM: out[m, n] = LN_n( sum_k A[m, k] W[n, k] + bias[n] ) for the Ho*Wo tokens m of one
// image, with A the never-materialised im2col of x, k = (kh, kw, cin) ordered cin fastest (for token
// input the channel dim is the contiguous one, so a k-slice reads consecutive channels of a pixel),
// and W the (Cout, K) weight in the same k order (a one-off permute of a small tensor, in Python).
//
// Work split: a block is 4 warps and owns BM = 16 * RW tokens and *all* Cout channels (Cout <= 512,
// padded inside the block to NB = a multiple of 8 per warp), so the LayerNorm statistics of a token
// are complete in the block: no second pass over HBM, the conv output never leaves the chip.
// - RW = 4 (Cout <= 64): the warps stack 4 x 16 tokens, each over all NB columns;
// - RW = 1 (64 < Cout <= 512): 16 tokens, each warp a quarter of the NB columns.
// A warp computes 16 x 8 tiles in the register layout of the PTX mma.m16n8k16 accumulator (lane
// 4 g + t holds rows g and g + 8, columns 2t and 2t + 1): tensor cores for fp16/bf16 (sf_mma_m16n8k16,
// fp32 accumulation), IEEE fp32 FMAs for fp32 (no TF32). Per k-step the A tile (BM x BK, gathered
// with the zero padding as a predicate) and the W tile (NB x BK) are staged in shared memory.
//
// Epilogue: the fp32 accumulator tile goes to shared memory (aliasing the staging buffers), then a
// warp per token reduces it with shuffles: the mean first, then the variance of the centred values
// (two passes over shared memory, as the Triton kernel's masked `diff`), and writes the token's Cout
// outputs with consecutive lanes on consecutive channels (coalesced).
//
// Backward (dz kernel): recomputes the tile exactly like the forward (the same helper; why this beats
// saving z is argued in the Triton module), normalises it in place, and applies the LayerNorm
// backward: a warp per token forms c1 = mean(xhat * gamma * dy) and c2 = mean(gamma * dy), then a
// thread per channel walks the block's tokens in order, writes dz = rstd (gamma dy - xhat c1 - c2)
// and sums dbias (of dz), dgamma (of dy * xhat) and dbeta (of dy) for its channel into one fp32
// partial row per block; cl_reduce_kernel adds the rows in a fixed order (deterministic, no
// atomics). d(input) and d(weight) are the caller's (segformer_fast/ops/conv_layernorm.py).
//
// Kernels (grid, 128 threads unless said):
// - cl_fwd_kernel<T, RW> (cdiv(Ho*Wo, BM), B)
// - cl_dz_kernel<T, RW>  (cdiv(Ho*Wo, BM), B): dz and the partial rows
// - cl_reduce_kernel     (cdiv(3 Cout, 32)), 256 threads: the partial rows summed
#include <algorithm>
#include <type_traits>

#include "cuda/conv_layernorm.h"
#include "cuda/pack.cuh"
#include "cuda/portable.cuh"

namespace sf_cuda {
namespace {
namespace cl {  // named too: the emulated build compiles every .cu into one translation unit

constexpr int kThreads = 128;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxCout = 512;

template <class T, int RW>
struct ClCfg {
  static constexpr bool kF32 = std::is_same<T, float>::value;
  static constexpr int kBM = 16 * RW;              // tokens per block
  static constexpr int kCW = 4 / RW;               // warps side by side along the channels
  static constexpr int kNtMax = RW == 4 ? 8 : 16;  // 8-column tiles per warp, at most (Cout <= 64 / 512)
  static constexpr int kBK = kF32 ? 16 : 32;       // reduction slice per stage
  static constexpr int kLd = kBK + (kF32 ? 4 : 8); // smem row stride of the staged tiles: no bank conflicts
};

// 8-column tiles per warp and padded channel count NB of a block for Cout channels
template <class T, int RW>
SF_DEVICE int tiles_per_warp(int cout) {
  constexpr int cols = 8 * ClCfg<T, RW>::kCW;
  return (cout + cols - 1) / cols;
}

// Shared memory of one block: the tokens' window origins (BM int2), their statistics (BM float4) and
// one region used first for the staged A (BM x LD) and W (NB x LD) tiles, then for the fp32 output
// tile (BM x (NB + 4)).
template <class T, int RW>
size_t cl_smem(int cout) {
  using C = ClCfg<T, RW>;
  const int nb = C::kCW * 8 * ((cout + 8 * C::kCW - 1) / (8 * C::kCW));
  const size_t staging = size_t(C::kBM + nb) * C::kLd * sizeof(T);
  const size_t tile = size_t(C::kBM) * (nb + 4) * sizeof(float);
  return size_t(C::kBM) * (8 + 16) + std::max(staging, tile);
}

SF_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

template <class T, int V>
SF_DEVICE Pack<T, V> zero_pack() {
  Pack<T, V> z;
#pragma unroll
  for (int v = 0; v < V; ++v) z.v[v] = sf_from_float<T>(0.f);
  return z;
}

template <class T>
SF_DEVICE float load_or(const void* p, int i, float fallback) {
  return p ? sf_to_float(static_cast<const T*>(p)[i]) : fallback;
}

// The conv output tile of this block, without bias, as fp32 in sC (BM x ldc, ldc = NB + 4, padded
// columns 0); also fills srow. Ends with a barrier: sC is complete for every thread.
template <class T, int RW>
SF_DEVICE void conv_tile(const ConvLnParams& p, unsigned char* smem, int m0, int b, float*& sc_out, int& ldc_out) {
  using C = ClCfg<T, RW>;
  constexpr int BM = C::kBM, BK = C::kBK, LD = C::kLd, NTMAX = C::kNtMax;
  const int nt = tiles_per_warp<T, RW>(p.Cout);
  const int nb = C::kCW * 8 * nt, ldc = nb + 4;
  int* srow = reinterpret_cast<int*>(smem);                      // (BM, 2): hi0, wi0 of each token
  unsigned char* region = smem + BM * (8 + 16);                  // after srow and the stats
  T* sa = reinterpret_cast<T*>(region);                          // (BM, LD) im2col tile
  T* sb = sa + BM * LD;                                          // (NB, LD) weight tile
  float* sc = reinterpret_cast<float*>(region);                  // (BM, ldc) after the main loop

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int wr = warp / C::kCW, wc = warp % C::kCW;             // this warp's row group, column group
  const int Nout = p.Ho * p.Wo, K = p.KH * p.KW * p.Cin;
  for (int r = tid; r < BM; r += kThreads) {
    const int m = m0 + r;
    const bool ok = m < Nout;
    srow[2 * r] = ok ? (m / p.Wo) * p.stride_h - p.pad_h : -(1 << 29);   // invalid token: always out of range
    srow[2 * r + 1] = ok ? (m % p.Wo) * p.stride_w - p.pad_w : 0;
  }
  const T* x = static_cast<const T*>(p.x) + int64_t(b) * p.sxb;
  const T* w = static_cast<const T*>(p.w);

  // 16-byte loads: VEC consecutive k of one token (one pixel: Cin % VEC == 0) or one weight row
  constexpr int VEC = 16 / sizeof(T), CPR = BK / VEC;  // vectors per staged row

  float acc[NTMAX][4] = {};
  const int kk = tid % BK;                                       // scalar loads: this thread's k column
  for (int k0 = 0; k0 < K; k0 += BK) {
    __syncthreads();  // srow written (first step); every warp is done with the previous tiles
    if (p.vec_x) {
      for (int i = tid; i < BM * CPR; i += kThreads) {
        const int r = i / CPR, kc = (i % CPR) * VEC, k = k0 + kc;
        const int cin = k % p.Cin, tap = k / p.Cin;
        const int hi = srow[2 * r] + tap / p.KW, wi = srow[2 * r + 1] + tap % p.KW;
        Pack<T, VEC> v = zero_pack<T, VEC>();
        if (k < K && hi >= 0 && hi < p.H && wi >= 0 && wi < p.W)  // zero padding as a predicate
          v = ld_pack<T, VEC>(x + cin + int64_t(hi) * p.sxh + int64_t(wi) * p.sxw);
        st_pack<T, VEC>(sa + r * LD + kc, v);
      }
    } else {
      const int k = k0 + kk;
      const int cin = k % p.Cin, tap = k / p.Cin, kh = tap / p.KW, kw = tap % p.KW;
      for (int r = tid / BK; r < BM; r += kThreads / BK) {
        const int hi = srow[2 * r] + kh, wi = srow[2 * r + 1] + kw;
        T v = sf_from_float<T>(0.f);
        if (k < K && hi >= 0 && hi < p.H && wi >= 0 && wi < p.W)
          v = x[int64_t(cin) * p.sxc + int64_t(hi) * p.sxh + int64_t(wi) * p.sxw];
        sa[r * LD + kk] = v;
      }
    }
    if (p.vec_w) {
      for (int i = tid; i < nb * CPR; i += kThreads) {
        const int n = i / CPR, kc = (i % CPR) * VEC, k = k0 + kc;
        Pack<T, VEC> v = zero_pack<T, VEC>();
        if (k < K && n < p.Cout) v = ld_pack<T, VEC>(w + int64_t(n) * K + k);
        st_pack<T, VEC>(sb + n * LD + kc, v);
      }
    } else {
      const int k = k0 + kk;
      for (int n = tid / BK; n < nb; n += kThreads / BK)
        sb[n * LD + kk] = (k < K && n < p.Cout) ? w[int64_t(n) * K + k] : sf_from_float<T>(0.f);
    }
    __syncthreads();  // both tiles complete before any warp reads them

    const T* a0 = sa + (wr * 16 + g) * LD;
    const T* bw = sb + (wc * nt * 8) * LD;
    if constexpr (C::kF32) {
#pragma unroll 2
      for (int c = 0; c < BK; ++c) {
        const float x0 = a0[c], x1 = a0[8 * LD + c];
#pragma unroll
        for (int j = 0; j < NTMAX; ++j) {
          if (j >= nt) break;  // warp-uniform
          const float y0 = bw[(j * 8 + 2 * t) * LD + c], y1 = bw[(j * 8 + 2 * t + 1) * LD + c];
          acc[j][0] = fmaf(x0, y0, acc[j][0]);
          acc[j][1] = fmaf(x0, y1, acc[j][1]);
          acc[j][2] = fmaf(x1, y0, acc[j][2]);
          acc[j][3] = fmaf(x1, y1, acc[j][3]);
        }
      }
    } else {
#pragma unroll
      for (int ks = 0; ks < BK / 16; ++ks) {
        const int c = ks * 16 + 2 * t;
        const uint32_t fa[4] = {sf_ld_pair(a0 + c), sf_ld_pair(a0 + 8 * LD + c), sf_ld_pair(a0 + c + 8),
                                sf_ld_pair(a0 + 8 * LD + c + 8)};
#pragma unroll
        for (int j = 0; j < NTMAX; ++j) {
          if (j >= nt) break;  // warp-uniform
          const T* brow = bw + (j * 8 + g) * LD + c;
          const uint32_t fb[2] = {sf_ld_pair(brow), sf_ld_pair(brow + 8)};
          sf_mma_m16n8k16<T>(acc[j], fa, fb);
        }
      }
    }
  }
  __syncthreads();  // every warp is done with the staged tiles: the region becomes sC
#pragma unroll
  for (int j = 0; j < NTMAX; ++j) {
    if (j >= nt) break;
    const int col = (wc * nt + j) * 8 + 2 * t;
    float* r0 = sc + (wr * 16 + g) * ldc + col;
    r0[0] = acc[j][0];
    r0[1] = acc[j][1];
    r0[8 * ldc] = acc[j][2];
    r0[8 * ldc + 1] = acc[j][3];
  }
  __syncthreads();  // sC complete
  sc_out = sc;
  ldc_out = ldc;
}

// mean and rstd of row z[c] + bias[c], c < Cout, for a whole warp (every lane gets both)
template <class T>
SF_DEVICE void row_stats(const float* z, const ConvLnParams& p, int lane, float& mean, float& rstd) {
  float s = 0.f;
  for (int c = lane; c < p.Cout; c += 32) s += z[c] + load_or<T>(p.bias, c, 0.f);
  mean = warp_sum(s) / p.Cout;
  float q = 0.f;
  for (int c = lane; c < p.Cout; c += 32) {
    const float d = z[c] + load_or<T>(p.bias, c, 0.f) - mean;
    q = fmaf(d, d, q);
  }
  rstd = 1.f / sqrtf(warp_sum(q) / p.Cout + p.eps);
}

// ------------------------------------------------------------------------------------ forward
template <class T, int RW>
__global__ void __launch_bounds__(kThreads) cl_fwd_kernel(const ConvLnParams p) {
  constexpr int BM = ClCfg<T, RW>::kBM;
  SF_DYNAMIC_SMEM(smem);
  const int m0 = blockIdx.x * BM, b = blockIdx.y, Nout = p.Ho * p.Wo;
  float* sc;
  int ldc;
  conv_tile<T, RW>(p, smem, m0, b, sc, ldc);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* out = static_cast<T*>(p.out);
  for (int r = warp; r < BM && m0 + r < Nout; r += kThreads / 32) {  // warp-uniform
    const float* z = sc + r * ldc;
    float mean, rstd;
    row_stats<T>(z, p, lane, mean, rstd);
    T* o = out + (int64_t(b) * Nout + m0 + r) * p.Cout;
    for (int c = lane; c < p.Cout; c += 32) {
      const float y = (z[c] + load_or<T>(p.bias, c, 0.f) - mean) * rstd;
      o[c] = sf_from_float<T>(y * load_or<T>(p.gamma, c, 1.f) + load_or<T>(p.beta, c, 0.f));
    }
  }
}

// ------------------------------------------------------------------------------------ backward: dz
template <class T, int RW>
__global__ void __launch_bounds__(kThreads) cl_dz_kernel(const ConvLnParams p) {
  constexpr int BM = ClCfg<T, RW>::kBM;
  SF_DYNAMIC_SMEM(smem);
  const int m0 = blockIdx.x * BM, b = blockIdx.y, Nout = p.Ho * p.Wo;
  float* sc;
  int ldc;
  conv_tile<T, RW>(p, smem, m0, b, sc, ldc);
  float* stat = reinterpret_cast<float*>(smem + BM * 8);         // (BM, 4): rstd, c1, c2, unused

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows = BM < Nout - m0 ? BM : Nout - m0;
  const T* dy = static_cast<const T*>(p.dy) + (int64_t(b) * Nout + m0) * p.Cout;
  // a warp per token: normalise in place (sC := xhat), then c1, c2
  for (int r = warp; r < rows; r += kThreads / 32) {  // warp-uniform
    float* z = sc + r * ldc;
    float mean, rstd;
    row_stats<T>(z, p, lane, mean, rstd);
    float a1 = 0.f, a2 = 0.f;
    for (int c = lane; c < p.Cout; c += 32) {
      const float xhat = (z[c] + load_or<T>(p.bias, c, 0.f) - mean) * rstd;
      const float wdy = sf_to_float(dy[int64_t(r) * p.Cout + c]) * load_or<T>(p.gamma, c, 1.f);
      z[c] = xhat;
      a1 = fmaf(xhat, wdy, a1);
      a2 += wdy;
    }
    a1 = warp_sum(a1);
    a2 = warp_sum(a2);
    if (lane == 0) {
      stat[4 * r] = rstd;
      stat[4 * r + 1] = a1 / p.Cout;
      stat[4 * r + 2] = a2 / p.Cout;
    }
  }
  __syncthreads();  // xhat and the row constants complete
  // a thread per channel: dz of the block's tokens in order, and the channel's partial sums
  T* dz = static_cast<T*>(p.out) + (int64_t(b) * Nout + m0) * p.Cout;
  float* part = p.part + int64_t(blockIdx.y * gridDim.x + blockIdx.x) * 3 * p.Cout;
  for (int c = threadIdx.x; c < p.Cout; c += kThreads) {
    const float gam = load_or<T>(p.gamma, c, 1.f);
    float dbias = 0.f, dgamma = 0.f, dbeta = 0.f;
    for (int r = 0; r < rows; ++r) {
      const float xhat = sc[r * ldc + c];
      const float d = sf_to_float(dy[int64_t(r) * p.Cout + c]);  // second read: an L1/L2 hit
      const float v = (d * gam - fmaf(xhat, stat[4 * r + 1], stat[4 * r + 2])) * stat[4 * r];
      dz[int64_t(r) * p.Cout + c] = sf_from_float<T>(v);
      dbias += v;
      dgamma = fmaf(d, xhat, dgamma);
      dbeta += d;
    }
    part[c] = dbias;
    part[p.Cout + c] = dgamma;
    part[2 * p.Cout + c] = dbeta;
  }
}

// dvec[i] = sum over rows q of part[q][i], i < n, in a fixed order: warp w sums rows w, w + 8, ...
// (lane = column), then warp 0 adds the 8 warp sums in order.
__global__ void __launch_bounds__(256) cl_reduce_kernel(const float* __restrict__ part, float* __restrict__ dvec,
                                                       int rows, int n) {
  SF_DYNAMIC_SMEM(smem);
  float* red = reinterpret_cast<float*>(smem);  // (8, 32)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, i = blockIdx.x * 32 + lane;
  float s = 0.f;
  if (i < n)
    for (int q = warp; q < rows; q += 8) s += part[int64_t(q) * n + i];
  red[warp * 32 + lane] = s;
  __syncthreads();
  if (warp == 0 && i < n) {
    float total = red[lane];
    for (int k = 1; k < 8; ++k) total += red[k * 32 + lane];
    dvec[i] = total;
  }
}

// ------------------------------------------------------------------------------------ launchers
int cdiv(int64_t a, int64_t b) { return int((a + b - 1) / b); }

template <class... P, class... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A... args) {
  if (smem > 48 * 1024) {  // never with Cout <= 512 (see cl_smem); kept for safety of future tiles
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  return SF_LAUNCH(kernel, grid, block, smem, stream, args...);
}

int rows_per_block(int cout) { return cout <= 64 ? 64 : 16; }

template <class F>
cudaError_t by_type(DType dtype, int cout, F&& f) {
  if (cout < 1 || cout > kMaxCout) return cudaErrorInvalidValue;
  auto by_rows = [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    if (cout <= 64) return f(T{}, std::integral_constant<int, 4>{});
    return f(T{}, std::integral_constant<int, 1>{});
  };
  switch (dtype) {
    case DType::kFloat32: return by_rows(float{});
    case DType::kFloat16: return by_rows(sf_half{});
    case DType::kBFloat16: return by_rows(sf_bf16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cl
}  // namespace

namespace {
// p with vec_x / vec_w decided for element size `e` (16-byte vectors of 16 / e elements)
ConvLnParams vectorised(ConvLnParams p, int e) {
  const int v = 16 / e;
  auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  p.vec_x = p.sxc == 1 && p.Cin % v == 0 && p.sxb % v == 0 && p.sxh % v == 0 && p.sxw % v == 0 && aligned(p.x);
  p.vec_w = (int64_t(p.KH) * p.KW * p.Cin) % v == 0 && aligned(p.w);
  return p;
}
}  // namespace

int conv_layernorm_blocks(DType, int B, int Ho, int Wo, int Cout) {
  return cl::cdiv(int64_t(Ho) * Wo, cl::rows_per_block(Cout)) * B;
}

cudaError_t conv_layernorm_fwd(DType dtype, const ConvLnParams& p, cudaStream_t stream) {
  return cl::by_type(dtype, p.Cout, [&](auto zero, auto rw) {
    using T = decltype(zero);
    constexpr int RW = decltype(rw)::value;
    const dim3 grid(cl::cdiv(int64_t(p.Ho) * p.Wo, 16 * RW), p.B);
    return cl::launch(cl::cl_fwd_kernel<T, RW>, grid, dim3(cl::kThreads), cl::cl_smem<T, RW>(p.Cout), stream,
                      vectorised(p, sizeof(T)));
  });
}

cudaError_t conv_layernorm_bwd(DType dtype, const ConvLnParams& p, float* dvec, cudaStream_t stream) {
  const cudaError_t e = cl::by_type(dtype, p.Cout, [&](auto zero, auto rw) {
    using T = decltype(zero);
    constexpr int RW = decltype(rw)::value;
    const dim3 grid(cl::cdiv(int64_t(p.Ho) * p.Wo, 16 * RW), p.B);
    return cl::launch(cl::cl_dz_kernel<T, RW>, grid, dim3(cl::kThreads), cl::cl_smem<T, RW>(p.Cout), stream,
                      vectorised(p, sizeof(T)));
  });
  if (e != cudaSuccess) return e;
  const int n = 3 * p.Cout;
  return cl::launch(cl::cl_reduce_kernel, dim3(cl::cdiv(n, 32)), dim3(256), 8 * 32 * sizeof(float), stream,
                static_cast<const float*>(p.part), dvec, conv_layernorm_blocks(dtype, p.B, p.Ho, p.Wo, p.Cout), n);
}

}  // namespace sf_cuda
