// Native CPU kernel for spatial-reduction attention in bf16 (segformer_fast.ops.sra_attention),
// inference only: out = softmax(q k^T * scale) v per head, on AVX512-BF16 dot products.
//
// Why: SegFormer's attention has many queries and few keys (stage 1 at 1024^2: 65,536 queries x
// 1,024 keys, head dim 32). PyTorch's CPU flash attention ran bf16 no faster than fp32 on the
// AVX512-BF16 CPU without AMX we measured (Zen 4: 65.2 vs 60.7 ms for that stage), while
// VDPBF16PS does twice the multiply-adds of an fp32 FMA. Here both products are VDPBF16PS register-tiled loops
// and the softmax stays in cache between them: for a block of QB queries of one head,
//   1. S = q k^T * scale, fp32 (QB x Mp), from K packed once per head into the dot-pair layout;
//   2. per row: max, p = exp(s - max) in fp32, sum in fp32, p rounded to bf16 (as PyTorch's bf16
//      attention does before its P.V product);
//   3. o = (p v) / sum, fp32 accumulation, rounded to bf16 once.
// Keys are padded to a multiple of 32 with zero K/V rows and p = 0, so any M works.
//
// Layouts (bf16 as uint16 bits): q (B, N, C) with C = H*d contiguous per row (row stride sq),
// k, v (B, M, C) with row strides sk, sv (k and v may be halves of one kv tensor); out (B, N, C)
// contiguous. d % 32 == 0 and d <= 128 (checked in Python and here).
//
// Runs only where the CPU has AVX512-BF16 (has_bf16_dot); SEGFORMER_FAST_CPU_ISA=portable turns it
// off, and then the op's dispatcher takes the torch composition (SDPA) instead.
#include "cpu/ops.h"
#include "cpu/isa.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if SF_HAVE_AVX512_BUILD
#include <immintrin.h>
#define SF_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

bool cpu_has_bf16_dot() {
#if SF_HAVE_AVX512_BUILD
  // use_avx512() checks the AVX-512 subsets and SEGFORMER_FAST_CPU_ISA; BF16 is the one extra
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has && sf_cpu::use_avx512();
#else
  return false;
#endif
}

#if SF_HAVE_AVX512_BUILD
namespace {

constexpr int QB = 32;        // query rows per task: S (QB x Mp fp32) stays in L2 for Mp <= 2048
constexpr int KT = 16;        // keys per K tile (one zmm of fp32 scores)

struct Head {                 // one (batch, head) pair's packed K and V
  std::vector<uint16_t> kp;   // [Mp/16][d/2][16][2]: tile j, dim pair t, key i -> k[16j+i][2t..2t+1]
  std::vector<uint16_t> vp;   // [Mp/2][d][2]: key pair p, dim c -> v[2p][c], v[2p+1][c]
};

void pack(const uint16_t* k, int64_t sk, const uint16_t* v, int64_t sv, int64_t M, int64_t Mp, int d,
          Head& h) {
  h.kp.assign(static_cast<size_t>(Mp) * d, 0);
  h.vp.assign(static_cast<size_t>(Mp) * d, 0);
  const int pairs = d / 2;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t j = m / KT, i = m % KT;
    for (int t = 0; t < pairs; ++t) {
      uint16_t* dst = &h.kp[((j * pairs + t) * KT + i) * 2];
      dst[0] = k[m * sk + 2 * t];
      dst[1] = k[m * sk + 2 * t + 1];
    }
    for (int c = 0; c < d; ++c) h.vp[((m / 2) * d + c) * 2 + (m % 2)] = v[m * sv + c];
  }
}

SF_AVX512_BF16 SF_INLINE __m512 exp_nonpositive(__m512 x) {
  // e^x for x <= 0: x = n ln2 + r, |r| <= ln2/2; degree-6 Taylor for e^r (relative error ~1e-7,
  // far below the bf16 rounding of p that follows), times 2^n by VSCALEFPS. x < -87.3 gives 0.
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

SF_AVX512_BF16 SF_INLINE __m512bh bcast_pair(const uint16_t* p) {
  int32_t pair;
  std::memcpy(&pair, p, 4);
  return (__m512bh)_mm512_set1_epi32(pair);
}

// S rows [0, RR) = q rows . K tiles, two tiles (32 keys) per step: 2*RR accumulators.
template <int RR>
SF_AVX512_BF16 void scores(const uint16_t* q, int64_t sq, const Head& h, int pairs, int64_t ktiles,
                           float scale, float* s, int64_t ss) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < ktiles; j += 2) {
    __m512 acc0[RR], acc1[RR];
    for (int r = 0; r < RR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    const uint16_t* k0 = &h.kp[static_cast<size_t>(j) * pairs * KT * 2];
    const uint16_t* k1 = k0 + static_cast<size_t>(pairs) * KT * 2;
    for (int t = 0; t < pairs; ++t) {
      const __m512bh kv0 = (__m512bh)_mm512_loadu_si512(k0 + t * KT * 2);
      const __m512bh kv1 = (__m512bh)_mm512_loadu_si512(k1 + t * KT * 2);
      for (int r = 0; r < RR; ++r) {
        const __m512bh qa = bcast_pair(q + r * sq + 2 * t);
        acc0[r] = _mm512_dpbf16_ps(acc0[r], qa, kv0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], qa, kv1);
      }
    }
    for (int r = 0; r < RR; ++r) {
      _mm512_storeu_ps(s + r * ss + j * KT, _mm512_mul_ps(acc0[r], vscale));
      _mm512_storeu_ps(s + r * ss + (j + 1) * KT, _mm512_mul_ps(acc1[r], vscale));
    }
  }
}

// One row's softmax numerator: p = bf16(exp(s - max)) over the M real keys, 0 for the padding up
// to Mp; returns the fp32 sum of exp(s - max) (before rounding, like PyTorch's bf16 attention).
SF_AVX512_BF16 float softmax_row(const float* s, int64_t M, int64_t Mp, uint16_t* p) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= M; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
  const __mmask16 tail = static_cast<__mmask16>((1u << (M - j)) - 1u);
  if (M - j) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, s + j));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (j = 0; j < Mp; j += 16) {
    const int64_t live = std::min<int64_t>(16, std::max<int64_t>(0, M - j));
    const __mmask16 m = static_cast<__mmask16>((1u << live) - 1u);
    const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + j), mx)));
    vsum = _mm512_add_ps(vsum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return _mm512_reduce_add_ps(vsum);
}

// out rows [0, RR) = (p rows . V) / sums, DT tiles of 16 output channels, one key pair per step.
template <int RR, int DT>
SF_AVX512_BF16 void values(const uint16_t* p, int64_t Mp, const Head& h, const float* sums, uint16_t* o,
                           int64_t so) {
  constexpr int d = DT * 16;
  __m512 acc[RR][DT];
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < DT; ++c) acc[r][c] = _mm512_setzero_ps();
  const uint16_t* vp = h.vp.data();
  for (int64_t pr = 0; pr < Mp / 2; ++pr) {
    __m512bh vv[DT];
    for (int c = 0; c < DT; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vp + (pr * d + c * 16) * 2);
    for (int r = 0; r < RR; ++r) {
      const __m512bh pa = bcast_pair(p + r * Mp + 2 * pr);
      for (int c = 0; c < DT; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pa, vv[c]);
    }
  }
  for (int r = 0; r < RR; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / sums[r]);
    for (int c = 0; c < DT; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + r * so + c * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], inv)));
  }
}

template <int DT>
SF_AVX512_BF16 void values_rows(const uint16_t* p, int64_t Mp, const Head& h, const float* sums, uint16_t* o,
                                int64_t so, int rows) {
  constexpr int RR = DT <= 2 ? 8 : (DT <= 4 ? 4 : 2);   // RR * DT accumulators: 16 of 32 zmm
  int r = 0;
  for (; r + RR <= rows; r += RR) values<RR, DT>(p + r * Mp, Mp, h, sums + r, o + r * so, so);
  for (; r < rows; ++r) values<1, DT>(p + r * Mp, Mp, h, sums + r, o + r * so, so);
}

SF_AVX512_BF16 void block(const uint16_t* q, int64_t sq, const Head& h, int d, int64_t M, int64_t Mp,
                          float scale, int rows, float* s, uint16_t* p, float* sums, uint16_t* o, int64_t so) {
  const int pairs = d / 2;
  const int64_t ktiles = Mp / KT;
  int r = 0;
  for (; r + 8 <= rows; r += 8) scores<8>(q + r * sq, sq, h, pairs, ktiles, scale, s + r * Mp, Mp);
  for (; r < rows; ++r) scores<1>(q + r * sq, sq, h, pairs, ktiles, scale, s + r * Mp, Mp);
  for (r = 0; r < rows; ++r) sums[r] = softmax_row(s + r * Mp, M, Mp, p + r * Mp);
  switch (d / 16) {
    case 2: values_rows<2>(p, Mp, h, sums, o, so, rows); break;
    case 4: values_rows<4>(p, Mp, h, sums, o, so, rows); break;
    case 6: values_rows<6>(p, Mp, h, sums, o, so, rows); break;
    default: values_rows<8>(p, Mp, h, sums, o, so, rows); break;
  }
}

}  // namespace
#endif

torch::Tensor sra_attention_bf16_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                         int64_t num_heads, double scale) {
  // Shapes, dtypes and devices are checked in Python (segformer_fast/ops/sra_attention.py); here
  // only what the raw-pointer code relies on.
  TORCH_CHECK(cpu_has_bf16_dot(), "sra_attention_bf16_forward: this CPU has no AVX512-BF16");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16, "sra_attention_bf16_forward: q, k, v must be bfloat16");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 &&
                  v.stride(2) == 1, "sra_attention_bf16_forward: (B, tokens, C) with contiguous channels");
  const int64_t B = q.size(0), N = q.size(1), C = q.size(2), M = k.size(1);
  const int d = static_cast<int>(C / num_heads);
  TORCH_CHECK(C % num_heads == 0 && d % 32 == 0 && d <= 128,
              "sra_attention_bf16_forward: head dim must be a multiple of 32 and <= 128, got ", d);
  auto out = torch::empty({B, N, C}, q.options());
#if SF_HAVE_AVX512_BUILD
  const int64_t Mp = (M + 31) / 32 * 32;
  const auto* qd = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kd = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vd = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* od = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t H = num_heads;
  std::vector<Head> heads(B * H);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, hh = bh % H;
      pack(kd + b * k.stride(0) + hh * d, k.stride(1), vd + b * v.stride(0) + hh * d, v.stride(1), M, Mp, d,
           heads[bh]);
    }
  });
  const int64_t qblocks = (N + QB - 1) / QB;
  at::parallel_for(0, B * H * qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(static_cast<size_t>(QB) * Mp), sums(QB);
    std::vector<uint16_t> p(static_cast<size_t>(QB) * Mp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / qblocks, qb = task % qblocks;
      const int64_t b = bh / H, hh = bh % H, n0 = qb * QB;
      const int rows = static_cast<int>(std::min<int64_t>(QB, N - n0));
      block(qd + b * q.stride(0) + n0 * q.stride(1) + hh * d, q.stride(1), heads[bh], d, M, Mp,
            static_cast<float>(scale), rows, s.data(), p.data(), sums.data(), od + (b * N + n0) * C + hh * d, C);
    }
  });
#endif
  return out;
}
