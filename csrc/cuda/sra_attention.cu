// Spatial-reduction attention (many queries, few keys) in CUDA C++: the twin of
// segformer_fast/kernels/triton/sra_attention.py, with the same math and numerics contract.
//
// Layout: q, dO (B, N, C); k, v (B, M, C); head h owns channels h*d .. (h+1)*d (d <= 128, padded
// to D = 32, 64 or 128 inside the kernels with zeros). Rows are read through (batch, row) strides
// with the channel stride 1, so k and v may be the column halves of one (B, M, 2C) kv tensor.
//
// Work split: a block is 4 warps; every warp owns 16 rows of the problem (queries in the forward
// and dQ kernels, keys in the dK/dV kernel) and computes 16 x 8 tiles in the register layout of
// the PTX mma.m16n8k16 accumulator (lane = 4 g + t holds rows g and g+8, columns 2t and 2t+1).
// - fp16/bf16: tensor cores through sf_mma_m16n8k16 (portable.cuh); probabilities go from the
//   accumulator layout straight into the next MMA's A operand (FlashAttention-2's register trick).
// - fp32: the same tiles with IEEE fp32 FMAs (no TF32); probabilities go through a per-warp
//   shared-memory scratch so every lane sees its rows' full probability vectors.
// The row statistics (max, sum, delta) of a row are spread over the 4 lanes of a quad and reduced
// with __shfl_xor_sync(…, 1) and (…, 2). Softmax statistics and every accumulation are fp32.
//
// Kernels (grid):
// - sra_fwd_kernel (N/64, B*H): a 64-query tile; K/V of the head staged in shared memory tile by
//   tile (64 keys; 32 for fp32 d > 64), online softmax in base 2, writes O and LSE (fp32).
// - sra_dq_kernel (N/64, B*H): delta = rowsum(P * dP) over a first sweep of the keys (as the
//   Triton kernel does: from the same recomputed P and dP, so sum_j dS_ij vanishes to rounding),
//   then dQ = scale * dS K over a second sweep.
// - sra_dkdv_kernel (M/64, B*H, splits): dK, dV of a 64-key tile summed over one chunk of query
//   tiles, written as fp32 partial sums per chunk; sra_reduce_kernel then adds the chunks in a fixed
//   order (deterministic, no atomics).
#include <algorithm>
#include <type_traits>

#include "cuda/portable.cuh"
#include "cuda/sra_attention.h"

#if defined(__CUDACC__)
#define SF_INF __int_as_float(0x7f800000)
#else
#define SF_INF INFINITY
#endif

namespace sf_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // rows owned by a block: queries (fwd, dQ) or keys (dK/dV)
constexpr unsigned kFull = 0xffffffffu;

// Tile sizes per element type and padded head dim; shared memory stays <= 99 KB (sm_86/89 cap).
template <class T, int D>
struct Cfg {
  static constexpr bool kF32 = std::is_same<T, float>::value;
  static constexpr int kLd = D + (kF32 ? 4 : 8);                    // smem row stride: no bank conflicts
  static constexpr int kFwdKeys = (kF32 && D > 64) ? 32 : 64;       // key tile of the forward
  static constexpr int kDqKeys = (kF32 && D > 64) ? 16 : 64;        // key tile of dQ
  static constexpr int kDkdvQueries = D > 64 ? (kF32 ? 16 : 32) : 64;  // query tile of dK/dV
};

// rows [r0, r0 + ROWS) x channels [0, D) of a head slab (row stride `stride`, `nrows` real rows,
// `d` real channels) -> smem (ROWS, LD); padding rows and channels become 0.
template <class T, int ROWS, int D, int LD>
SF_DEVICE void load_tile(T* __restrict__ dst, const T* __restrict__ src, int64_t stride, int r0, int nrows,
                         int d) {
  for (int i = threadIdx.x; i < ROWS * D; i += kThreads) {
    const int r = i / D, c = i % D;
    T val = sf_from_float<T>(0.f);
    if (r0 + r < nrows && c < d) val = src[int64_t(r0 + r) * stride + c];
    dst[r * LD + c] = val;
  }
}

// acc[NT][4] += A B^T for one warp: A = 16 rows of smem `a` (stride LD), B = 8*NT rows of smem `b`,
// both D wide; acc in the mma accumulator layout (rows g, g+8 x columns 8 nt + 2t, +1).
template <class T, int D, int LD, int NT>
SF_DEVICE void warp_abt(float (&acc)[NT][4], const T* __restrict__ a, const T* __restrict__ b, int lane) {
  const int g = lane >> 2, t = lane & 3;
  if constexpr (std::is_same<T, float>::value) {
    const float* a0 = a + g * LD;
    const float* a1 = a + (g + 8) * LD;
#pragma unroll 2
    for (int kk = 0; kk < D; ++kk) {
      const float x0 = a0[kk], x1 = a1[kk];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float y0 = b[(nt * 8 + 2 * t) * LD + kk], y1 = b[(nt * 8 + 2 * t + 1) * LD + kk];
        acc[nt][0] = fmaf(x0, y0, acc[nt][0]);
        acc[nt][1] = fmaf(x0, y1, acc[nt][1]);
        acc[nt][2] = fmaf(x1, y0, acc[nt][2]);
        acc[nt][3] = fmaf(x1, y1, acc[nt][3]);
      }
    }
  } else {
#pragma unroll
    for (int kt = 0; kt < D / 16; ++kt) {
      const int c = kt * 16 + 2 * t;
      const uint32_t fa[4] = {sf_ld_pair(a + g * LD + c), sf_ld_pair(a + (g + 8) * LD + c),
                              sf_ld_pair(a + g * LD + c + 8), sf_ld_pair(a + (g + 8) * LD + c + 8)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const T* brow = b + (nt * 8 + g) * LD + c;
        const uint32_t fb[2] = {sf_ld_pair(brow), sf_ld_pair(brow + 8)};
        sf_mma_m16n8k16<T>(acc[nt], fa, fb);
      }
    }
  }
}

// acc[D/8][4] += P V for one warp: P = 16 x 8*NT in registers (accumulator layout), V = 8*NT rows of
// smem `v` (stride LD), of which the first `valid` are real (the rest are zero in smem and in P).
// fp32 passes P through `scratch` (this warp's 16 x (8*NT + 4) floats).
template <class T, int D, int LD, int NT>
SF_DEVICE void warp_pv(float (&acc)[D / 8][4], const float (&p)[NT][4], const T* __restrict__ v,
                       float* __restrict__ scratch, int valid, int lane) {
  const int g = lane >> 2, t = lane & 3;
  if constexpr (std::is_same<T, float>::value) {
    constexpr int SP = NT * 8 + 4;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      scratch[g * SP + nt * 8 + 2 * t] = p[nt][0];
      scratch[g * SP + nt * 8 + 2 * t + 1] = p[nt][1];
      scratch[(g + 8) * SP + nt * 8 + 2 * t] = p[nt][2];
      scratch[(g + 8) * SP + nt * 8 + 2 * t + 1] = p[nt][3];
    }
    __syncwarp();  // the quad's other lanes wrote the rest of rows g and g + 8
    for (int j = 0; j < valid; ++j) {
      const float x0 = scratch[g * SP + j], x1 = scratch[(g + 8) * SP + j];
      const float* vrow = v + j * LD + 2 * t;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const float y0 = vrow[dt * 8], y1 = vrow[dt * 8 + 1];
        acc[dt][0] = fmaf(x0, y0, acc[dt][0]);
        acc[dt][1] = fmaf(x0, y1, acc[dt][1]);
        acc[dt][2] = fmaf(x1, y0, acc[dt][2]);
        acc[dt][3] = fmaf(x1, y1, acc[dt][3]);
      }
    }
    __syncwarp();  // every lane has read the scratch before the next call overwrites it
  } else {
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      if (kk * 16 >= valid) break;  // warp-uniform
      // two 16x8 accumulator tiles of P are exactly one 16x16 A fragment
      const uint32_t fa[4] = {sf_pack_pair<T>(p[2 * kk][0], p[2 * kk][1]),
                              sf_pack_pair<T>(p[2 * kk][2], p[2 * kk][3]),
                              sf_pack_pair<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                              sf_pack_pair<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
      const T* vcol = v + (kk * 16 + 2 * t) * LD + g;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const T* vp = vcol + dt * 8;
        const uint32_t fb[2] = {sf_pack_raw(vp[0], vp[LD]), sf_pack_raw(vp[8 * LD], vp[9 * LD])};
        sf_mma_m16n8k16<T>(acc[dt], fa, fb);
      }
    }
  }
}

SF_DEVICE int imin(int a, int b) { return a < b ? a : b; }

SF_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFull, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFull, x, 2));
}
SF_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(kFull, x, 1);
  return x + __shfl_xor_sync(kFull, x, 2);
}

// ------------------------------------------------------------------------------------ forward
template <class T, int D>
__global__ void __launch_bounds__(kThreads) sra_fwd_kernel(const SraParams p) {
  using C = Cfg<T, D>;
  constexpr int LD = C::kLd, BM = C::kFwdKeys, NT = BM / 8;
  SF_DYNAMIC_SMEM(smem);
  T* sq = reinterpret_cast<T*>(smem);                  // (64, LD) query tile
  T* sk = sq + kRows * LD;                             // (BM, LD) key tile
  T* sv = sk + BM * LD;                                // (BM, LD) value tile
  float* scratch = reinterpret_cast<float*>(sv + BM * LD);  // fp32: (4 warps, 16, BM + 4)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kRows, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int N = p.N, M = p.M, d = p.d, Cc = p.H * p.d;
  const T* q = static_cast<const T*>(p.q) + b * p.sqb + h * d;
  const T* k = static_cast<const T*>(p.k) + b * p.skb + h * d;
  const T* v = static_cast<const T*>(p.v) + b * p.svb + h * d;
  const T* sqw = sq + warp * 16 * LD;
  float* scr = scratch + warp * 16 * (BM + 4);

  load_tile<T, kRows, D, LD>(sq, q, p.sqn, n0, N, d);
  float m_i[2] = {-SF_INF, -SF_INF}, l_i[2] = {0.f, 0.f};  // rows g, g + 8: running max, sum
  float acc[D / 8][4] = {};
  for (int m0 = 0; m0 < M; m0 += BM) {
    __syncthreads();  // every warp is done with the previous K/V tile
    load_tile<T, BM, D, LD>(sk, k, p.skm, m0, M, d);
    load_tile<T, BM, D, LD>(sv, v, p.svm, m0, M, d);
    __syncthreads();  // Q and this K/V tile are complete before any warp reads them
    float s[NT][4] = {};
    warp_abt<T, D, LD, NT>(s, sqw, sk, lane);
    // scores in log2 units; padded keys get -inf so that they weigh exactly 0
    float mx[2] = {-SF_INF, -SF_INF};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = m0 + nt * 8 + 2 * t + (e & 1) < M ? s[nt][e] * p.qk_scale : -SF_INF;
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m_i[r], quad_max(mx[r]));  // finite: every tile holds a real key
      alpha[r] = exp2f(m_i[r] - m_new);
      m_i[r] = m_new;
      l_i[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(s[nt][e] - m_i[e >> 1]);
        s[nt][e] = pe;
        l_i[e >> 1] += pe;  // this lane's columns only; the quad is summed at the end
      }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      acc[dt][0] *= alpha[0];
      acc[dt][1] *= alpha[0];
      acc[dt][2] *= alpha[1];
      acc[dt][3] *= alpha[1];
    }
    warp_pv<T, D, LD, NT>(acc, s, sv, scr, imin(BM, M - m0), lane);
  }

  T* o = static_cast<T*>(p.o) + int64_t(b) * N * Cc + h * d;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_i[r]);
    const int row = n0 + warp * 16 + g + 8 * r;
    if (row >= N) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = dt * 8 + 2 * t + e;
        if (c < d) o[int64_t(row) * Cc + c] = sf_from_float<T>(acc[dt][2 * r + e] / l);
      }
    if (t == 0) p.lse[int64_t(bh) * N + row] = m_i[r] + log2f(l);
  }
}

// ------------------------------------------------------------------------------------ dQ
template <class T, int D>
__global__ void __launch_bounds__(kThreads) sra_dq_kernel(const SraParams p) {
  using C = Cfg<T, D>;
  constexpr int LD = C::kLd, BM = C::kDqKeys, NT = BM / 8;
  SF_DYNAMIC_SMEM(smem);
  T* sq = reinterpret_cast<T*>(smem);                  // (64, LD) query tile
  T* sdo = sq + kRows * LD;                            // (64, LD) dO tile
  T* sk = sdo + kRows * LD;                            // (BM, LD) key tile
  T* sv = sk + BM * LD;                                // (BM, LD) value tile
  float* scratch = reinterpret_cast<float*>(sv + BM * LD);  // fp32: (4 warps, 16, BM + 4)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kRows, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int N = p.N, M = p.M, d = p.d, Cc = p.H * p.d;
  const T* q = static_cast<const T*>(p.q) + b * p.sqb + h * d;
  const T* k = static_cast<const T*>(p.k) + b * p.skb + h * d;
  const T* v = static_cast<const T*>(p.v) + b * p.svb + h * d;
  const T* dout = static_cast<const T*>(p.dout) + b * p.sdob + h * d;
  const T* sqw = sq + warp * 16 * LD;
  const T* sdow = sdo + warp * 16 * LD;
  float* scr = scratch + warp * 16 * (BM + 4);

  load_tile<T, kRows, D, LD>(sq, q, p.sqn, n0, N, d);
  load_tile<T, kRows, D, LD>(sdo, dout, p.sdon, n0, N, d);
  float lse[2], delta[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = n0 + warp * 16 + g + 8 * r;
    lse[r] = row < N ? p.lse[int64_t(bh) * N + row] : 0.f;
  }

  // sweep 1: delta_i = sum_j P_ij dP_ij; sweep 2: dQ = scale * sum_j P_ij (dP_ij - delta_i) K_j
  float acc[D / 8][4] = {};
  for (int sweep = 0; sweep < 2; ++sweep) {
    for (int m0 = 0; m0 < M; m0 += BM) {
      __syncthreads();  // every warp is done with the previous K/V tile
      load_tile<T, BM, D, LD>(sk, k, p.skm, m0, M, d);
      load_tile<T, BM, D, LD>(sv, v, p.svm, m0, M, d);
      __syncthreads();  // Q, dO and this K/V tile are complete before any warp reads them
      float s[NT][4] = {}, dp[NT][4] = {};
      warp_abt<T, D, LD, NT>(s, sqw, sk, lane);
      warp_abt<T, D, LD, NT>(dp, sdow, sv, lane);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool real = m0 + nt * 8 + 2 * t + (e & 1) < M;
          const float pe = real ? exp2f(s[nt][e] * p.qk_scale - lse[e >> 1]) : 0.f;
          if (sweep == 0) delta[e >> 1] = fmaf(pe, dp[nt][e], delta[e >> 1]);
          else s[nt][e] = pe * (dp[nt][e] - delta[e >> 1]);  // dS
        }
      if (sweep == 1) warp_pv<T, D, LD, NT>(acc, s, sk, scr, imin(BM, M - m0), lane);
    }
    if (sweep == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        delta[r] = quad_sum(delta[r]);
        const int row = n0 + warp * 16 + g + 8 * r;
        if (t == 0 && row < N) p.delta[int64_t(bh) * N + row] = delta[r];
      }
    }
  }

  T* dq = static_cast<T*>(p.o) + int64_t(b) * N * Cc + h * d;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = n0 + warp * 16 + g + 8 * r;
    if (row >= N) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = dt * 8 + 2 * t + e;
        if (c < d) dq[int64_t(row) * Cc + c] = sf_from_float<T>(acc[dt][2 * r + e] * p.sm_scale);
      }
  }
}

// ------------------------------------------------------------------------------------ dK, dV
template <class T, int D>
__global__ void __launch_bounds__(kThreads) sra_dkdv_kernel(const SraParams p) {
  using C = Cfg<T, D>;
  constexpr int LD = C::kLd, BN = C::kDkdvQueries, NT = BN / 8;
  SF_DYNAMIC_SMEM(smem);
  T* sk = reinterpret_cast<T*>(smem);                  // (64, LD) key tile
  T* sv = sk + kRows * LD;                             // (64, LD) value tile
  T* sq = sv + kRows * LD;                             // (BN, LD) query tile
  T* sdo = sq + BN * LD;                               // (BN, LD) dO tile
  float* slse = reinterpret_cast<float*>(sdo + BN * LD);    // (BN,) LSE of the query tile
  float* sdelta = slse + BN;                                 // (BN,) delta of the query tile
  float* scratch = sdelta + BN;                              // fp32: (4 warps, 16, BN + 4)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * kRows, bh = blockIdx.y, split = blockIdx.z, b = bh / p.H, h = bh % p.H;
  const int N = p.N, M = p.M, d = p.d, Cc = p.H * p.d;
  const T* q = static_cast<const T*>(p.q) + b * p.sqb + h * d;
  const T* k = static_cast<const T*>(p.k) + b * p.skb + h * d;
  const T* v = static_cast<const T*>(p.v) + b * p.svb + h * d;
  const T* dout = static_cast<const T*>(p.dout) + b * p.sdob + h * d;
  const float* lse = p.lse + int64_t(bh) * N;
  const float* dlt = p.delta + int64_t(bh) * N;
  const T* skw = sk + warp * 16 * LD;
  const T* svw = sv + warp * 16 * LD;
  float* scr = scratch + warp * 16 * (BN + 4);

  load_tile<T, kRows, D, LD>(sk, k, p.skm, m0, M, d);
  load_tile<T, kRows, D, LD>(sv, v, p.svm, m0, M, d);
  // transposed problem: S^T = K Q^T (keys x queries), so dV = P^T dO and dK = dS^T Q are P V-like
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const int n_lo = split * p.tiles_per_split * BN;
  const int n_hi = imin(n_lo + p.tiles_per_split * BN, N);
  for (int n0 = n_lo; n0 < n_hi; n0 += BN) {
    __syncthreads();  // every warp is done with the previous Q/dO tile
    load_tile<T, BN, D, LD>(sq, q, p.sqn, n0, N, d);
    load_tile<T, BN, D, LD>(sdo, dout, p.sdon, n0, N, d);
    for (int i = threadIdx.x; i < BN; i += kThreads) {
      slse[i] = n0 + i < N ? lse[n0 + i] : 0.f;
      sdelta[i] = n0 + i < N ? dlt[n0 + i] : 0.f;
    }
    __syncthreads();  // K/V and this Q/dO tile are complete before any warp reads them
    float st[NT][4] = {}, dpt[NT][4] = {};
    warp_abt<T, D, LD, NT>(st, skw, sq, lane);
    warp_abt<T, D, LD, NT>(dpt, svw, sdo, lane);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e & 1);
        const float pe = n0 + col < N ? exp2f(st[nt][e] * p.qk_scale - slse[col]) : 0.f;
        st[nt][e] = pe;                                  // P^T
        dpt[nt][e] = pe * (dpt[nt][e] - sdelta[col]);    // dS^T
      }
    const int valid = imin(BN, N - n0);
    warp_pv<T, D, LD, NT>(dv, st, sdo, scr, valid, lane);
    warp_pv<T, D, LD, NT>(dk, dpt, sq, scr, valid, lane);
  }

  const int64_t part = (int64_t(split) * p.B + b) * M;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = m0 + warp * 16 + g + 8 * r;
    if (key >= M) continue;
    float* dkp = p.dk_part + (part + key) * Cc + h * d;
    float* dvp = p.dv_part + (part + key) * Cc + h * d;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = dt * 8 + 2 * t + e;
        if (c < d) {
          dkp[c] = dk[dt][2 * r + e] * p.sm_scale;
          dvp[c] = dv[dt][2 * r + e];
        }
      }
  }
}

// out[i] = sum over s of part[s][i] (s = 0, 1, ... in order) in fp32, rounded once to T.
template <class T>
__global__ void __launch_bounds__(256) sra_reduce_kernel(const float* __restrict__ part, T* __restrict__ out,
                                                        int64_t count, int splits) {
  for (int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x; i < count; i += int64_t(gridDim.x) * 256) {
    float acc = part[i];
    for (int s = 1; s < splits; ++s) acc += part[s * count + i];
    out[i] = sf_from_float<T>(acc);
  }
}

// ------------------------------------------------------------------------------------ launchers
int cdiv(int64_t a, int64_t b) { return int((a + b - 1) / b); }

template <class T, int D>
size_t fwd_smem() {
  using C = Cfg<T, D>;
  return (kRows + 2 * C::kFwdKeys) * C::kLd * sizeof(T) + (C::kF32 ? kWarps * 16 * (C::kFwdKeys + 4) * 4 : 0);
}
template <class T, int D>
size_t dq_smem() {
  using C = Cfg<T, D>;
  return (2 * kRows + 2 * C::kDqKeys) * C::kLd * sizeof(T) + (C::kF32 ? kWarps * 16 * (C::kDqKeys + 4) * 4 : 0);
}
template <class T, int D>
size_t dkdv_smem() {
  using C = Cfg<T, D>;
  constexpr int BN = C::kDkdvQueries;
  return (2 * kRows + 2 * BN) * C::kLd * sizeof(T) + 2 * BN * 4 + (C::kF32 ? kWarps * 16 * (BN + 4) * 4 : 0);
}

// Opts in to > 48 KB of dynamic shared memory where needed, then launches.
template <class... P, class... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A... args) {
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  return SF_LAUNCH(kernel, grid, block, smem, stream, args...);
}

template <class T, int D>
cudaError_t fwd(const SraParams& p, cudaStream_t stream) {
  return launch(sra_fwd_kernel<T, D>, dim3(cdiv(p.N, kRows), p.B * p.H), dim3(kThreads), fwd_smem<T, D>(),
                stream, p);
}

template <class T, int D>
cudaError_t bwd(SraParams p, T* dk, T* dv, int splits, cudaStream_t stream) {
  cudaError_t e = launch(sra_dq_kernel<T, D>, dim3(cdiv(p.N, kRows), p.B * p.H), dim3(kThreads),
                         dq_smem<T, D>(), stream, p);
  if (e != cudaSuccess) return e;
  const int bn = Cfg<T, D>::kDkdvQueries;
  p.tiles_per_split = cdiv(cdiv(p.N, bn), splits);
  e = launch(sra_dkdv_kernel<T, D>, dim3(cdiv(p.M, kRows), p.B * p.H, splits), dim3(kThreads),
             dkdv_smem<T, D>(), stream, p);
  if (e != cudaSuccess) return e;
  const int64_t count = int64_t(p.B) * p.M * p.H * p.d;
  const dim3 grid(unsigned(std::min<int64_t>(cdiv(count, 256), 4096)));
  e = launch(sra_reduce_kernel<T>, grid, dim3(256), 0, stream, static_cast<const float*>(p.dk_part), dk, count,
             splits);
  if (e != cudaSuccess) return e;
  return launch(sra_reduce_kernel<T>, grid, dim3(256), 0, stream, static_cast<const float*>(p.dv_part), dv, count,
                splits);
}

int padded_dim(int d) { return d <= 32 ? 32 : d <= 64 ? 64 : 128; }

template <class F>
cudaError_t by_type(DType dtype, int d, F&& f) {
  if (d < 1 || d > 128) return cudaErrorInvalidValue;
  auto by_dim = [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    switch (padded_dim(d)) {
      case 32: return f(T{}, std::integral_constant<int, 32>{});
      case 64: return f(T{}, std::integral_constant<int, 64>{});
      default: return f(T{}, std::integral_constant<int, 128>{});
    }
  };
  switch (dtype) {
    case DType::kFloat32: return by_dim(float{});
    case DType::kFloat16: return by_dim(sf_half{});
    case DType::kBFloat16: return by_dim(sf_bf16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int sra_attention_dkdv_splits(DType dtype, int B, int N, int M, int H, int d) {
  // like the Triton launcher: ~1 long-running block per H100 SM (132), but at least 2 query tiles
  // per chunk (each chunk costs M*C fp32 partial writes and reads)
  int bn = 64;
  by_type(dtype, d, [&](auto zero, auto dim) {
    bn = Cfg<decltype(zero), decltype(dim)::value>::kDkdvQueries;
    return cudaSuccess;
  });
  const int n_tiles = cdiv(N, bn);
  const int blocks = cdiv(M, kRows) * B * H;
  const int want = cdiv(132, blocks);
  int splits = std::max(1, std::min(want, n_tiles / 2));
  const int per = cdiv(n_tiles, splits);
  return cdiv(n_tiles, per);  // no empty trailing chunks
}

cudaError_t sra_attention_fwd(DType dtype, const SraParams& p, cudaStream_t stream) {
  return by_type(dtype, p.d, [&](auto zero, auto dim) {
    return fwd<decltype(zero), decltype(dim)::value>(p, stream);
  });
}

cudaError_t sra_attention_bwd(DType dtype, SraParams p, void* dk, void* dv, int splits, cudaStream_t stream) {
  return by_type(dtype, p.d, [&](auto zero, auto dim) {
    using T = decltype(zero);
    return bwd<T, decltype(dim)::value>(p, static_cast<T*>(dk), static_cast<T*>(dv), splits, stream);
  });
}

}  // namespace sf_cuda
