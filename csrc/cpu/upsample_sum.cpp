// Native CPU kernel for the folded SegFormer decoder's epilogue (segformer_fast.ops.upsample_sum):
//   out[b, y, x, :] = act((sum_i bilinear_i(map_i)[b, y, x, :] + bias) * scale + shift)
// written once, in token layout (B, H*W, D). The stock composition (F.interpolate per map, then
// in-place adds and the affine/ReLU) makes one full-resolution pass per step; here every output
// row is produced while its inputs are in cache: the two source rows of each low-resolution map
// are small, and the D channels of one pixel are contiguous, so the inner loop is a plain
// vectorisable axpy over D.
//
// Index math is F.interpolate's (bilinear, align_corners=False, fp32 scale = in / out):
//   src = max(scale * (dst + 0.5) - 0.5, 0); i0 = (int)src; i1 = i0 + (i0 < in - 1); l1 = src - i0.
// Inference only: the op routes calls that need gradients to the differentiable torch path.
//
// fp32 or bf16 maps (all one dtype), output in the maps' dtype. bf16: sources are widened to fp32
// as they are read, each output row is summed in an fp32 row buffer, and the row is rounded to
// bf16 once, after the affine + ReLU (one rounding instead of one per map and per epilogue step as
// in the stock bf16 composition). The row loop is instantiated for AVX-512 and for a portable
// fallback, chosen per call (cpu/isa.h); both give identical numbers.
#include "cpu/ops.h"
#include "cpu/isa.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

struct Axis {  // per output coordinate: the two source indices and their weights
  std::vector<int64_t> i0, i1;
  std::vector<float> w0, w1;
};

Axis make_axis(int64_t in, int64_t out) {
  Axis a;
  a.i0.resize(out); a.i1.resize(out); a.w0.resize(out); a.w1.resize(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t d = 0; d < out; ++d) {
    float src = scale * (static_cast<float>(d) + 0.5f) - 0.5f;
    if (src < 0.f) src = 0.f;
    const int64_t i0 = static_cast<int64_t>(src);
    a.i0[d] = i0;
    a.i1[d] = i0 + (i0 < in - 1 ? 1 : 0);
    a.w1[d] = src - static_cast<float>(i0);
    a.w0[d] = 1.f - a.w1[d];
  }
  return a;
}

SF_INLINE float ld(const float* p, int64_t i) { return p[i]; }
SF_INLINE float ld(const uint16_t* p, int64_t i) { return sf_cpu::bf16_to_f32(p[i]); }

// Everything one output row needs; T = float or uint16_t (bf16 bits).
template <typename T>
struct Plan {
  std::vector<const T*> src;
  std::vector<Axis> ys, xs;
  std::vector<int64_t> hs, ws;
  std::vector<float> a, c;     // the folded epilogue a*x + c per channel
  bool affine = false, relu = false;
  int64_t H = 0, W = 0, D = 0;
  T* dst = nullptr;
};

// Sums output row ``row`` (b * H + y) into acc (W * D floats), applies the epilogue, writes it as T.
template <typename T>
SF_INLINE void row_impl(const Plan<T>& p, int64_t row, float* __restrict__ acc) {
  const int64_t H = p.H, W = p.W, D = p.D;
  const int64_t b = row / H, y = row % H;
  for (size_t i = 0; i < p.src.size(); ++i) {
    const int64_t h = p.hs[i], w = p.ws[i];
    const T* base = p.src[i] + b * h * w * D;
    if (h == H && w == W) {  // a map already at full size passes unchanged
      const T* __restrict__ r = base + y * W * D;
      if (i == 0) for (int64_t k = 0; k < W * D; ++k) acc[k] = ld(r, k);
      else for (int64_t k = 0; k < W * D; ++k) acc[k] += ld(r, k);
      continue;
    }
    const T* r0 = base + p.ys[i].i0[y] * w * D;
    const T* r1 = base + p.ys[i].i1[y] * w * D;
    const float wy0 = p.ys[i].w0[y], wy1 = p.ys[i].w1[y];
    const Axis& ax = p.xs[i];
    for (int64_t x = 0; x < W; ++x) {
      // __restrict__: the output row never aliases the sources, which lets the compiler
      // vectorise the channel loops
      const T* __restrict__ p00 = r0 + ax.i0[x] * D;
      const T* __restrict__ p01 = r0 + ax.i1[x] * D;
      const T* __restrict__ p10 = r1 + ax.i0[x] * D;
      const T* __restrict__ p11 = r1 + ax.i1[x] * D;
      // same association as PyTorch: h-lambda outside, w-lambda inside
      const float a00 = wy0 * ax.w0[x], a01 = wy0 * ax.w1[x];
      const float a10 = wy1 * ax.w0[x], a11 = wy1 * ax.w1[x];
      float* __restrict__ q = acc + x * D;
      if (i == 0) {
        for (int64_t d = 0; d < D; ++d)
          q[d] = a00 * ld(p00, d) + a01 * ld(p01, d) + a10 * ld(p10, d) + a11 * ld(p11, d);
      } else {
        for (int64_t d = 0; d < D; ++d)
          q[d] += a00 * ld(p00, d) + a01 * ld(p01, d) + a10 * ld(p10, d) + a11 * ld(p11, d);
      }
    }
  }
  // raw restrict pointers: through the vectors' operator[] the compiler must assume the output
  // stores may change them, and the loop stays scalar (4x slower at D = 256)
  const float* __restrict__ pa = p.a.data();
  const float* __restrict__ pc = p.c.data();
  T* __restrict__ o = p.dst + row * W * D;
  for (int64_t x = 0; x < W; ++x) {
    float* __restrict__ q = acc + x * D;
    T* __restrict__ out = o + x * D;
    if (p.affine || p.relu) {
      if (p.relu) {
        for (int64_t d = 0; d < D; ++d) q[d] = std::max(q[d] * pa[d] + pc[d], 0.f);
      } else {
        for (int64_t d = 0; d < D; ++d) q[d] = q[d] * pa[d] + pc[d];
      }
    }
    if constexpr (std::is_same_v<T, uint16_t>) {
      for (int64_t d = 0; d < D; ++d) out[d] = sf_cpu::f32_to_bf16(q[d]);
    }
  }
}

// fp32 sums straight into the output row; bf16 into an fp32 row buffer per worker.
template <typename T>
SF_INLINE void rows_impl(const Plan<T>& p, int64_t begin, int64_t end) {
  std::vector<float> buf(std::is_same_v<T, float> ? 0 : p.W * p.D);
  for (int64_t row = begin; row < end; ++row) {
    float* acc = std::is_same_v<T, float> ? reinterpret_cast<float*>(p.dst) + row * p.W * p.D : buf.data();
    row_impl(p, row, acc);
  }
}

template <typename T>
SF_AVX512 void rows_avx512(const Plan<T>& p, int64_t begin, int64_t end) { rows_impl(p, begin, end); }

template <typename T>
void rows_portable(const Plan<T>& p, int64_t begin, int64_t end) { rows_impl(p, begin, end); }

template <typename T>
void run(const std::vector<torch::Tensor>& maps, const std::vector<int64_t>& hws, Plan<T>& p) {
  for (size_t i = 0; i < maps.size(); ++i) {
    p.src.push_back(reinterpret_cast<const T*>(maps[i].data_ptr()));
    p.hs.push_back(hws[2 * i]);
    p.ws.push_back(hws[2 * i + 1]);
    p.ys.push_back(make_axis(p.hs.back(), p.H));
    p.xs.push_back(make_axis(p.ws.back(), p.W));
  }
  const bool avx512 = sf_cpu::use_avx512();
  const int64_t rows = maps[0].size(0) * p.H;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    if (avx512) rows_avx512(p, begin, end);
    else rows_portable(p, begin, end);
  });
}

}  // namespace

torch::Tensor upsample_sum_forward(const std::vector<torch::Tensor>& maps, const std::vector<int64_t>& hws,
                                   int64_t H, int64_t W, const c10::optional<torch::Tensor>& bias,
                                   const c10::optional<torch::Tensor>& scale,
                                   const c10::optional<torch::Tensor>& shift, bool relu) {
  // Shapes, dtypes and devices are checked in Python (segformer_fast/ops/upsample_sum.py) before
  // this is called; here only what the raw-pointer code relies on is asserted.
  TORCH_CHECK(!maps.empty() && hws.size() == 2 * maps.size(), "upsample_sum_forward: bad arguments");
  const auto dtype = maps[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "upsample_sum_forward: maps must be float32 or bfloat16");
  for (const auto& m : maps)
    TORCH_CHECK(m.scalar_type() == dtype && m.is_contiguous() && m.dim() == 3 && m.size(2) == maps[0].size(2),
                "upsample_sum_forward: maps must be contiguous (B, N, D) tensors of one dtype");
  for (const auto* t : {&bias, &scale, &shift})
    TORCH_CHECK(!t->has_value() || ((*t)->scalar_type() == at::kFloat && (*t)->is_contiguous()),
                "upsample_sum_forward: bias/scale/shift must be contiguous float32");
  const int64_t B = maps[0].size(0), D = maps[0].size(2);
  auto out = torch::empty({B, H * W, D}, maps[0].options());
  // Fold bias/scale/shift into one per-channel affine a*x + c (exactly what the epilogue does).
  std::vector<float> a(D, 1.f), c(D, 0.f);
  for (int64_t d = 0; d < D; ++d) {
    const float b = bias.has_value() ? bias->data_ptr<float>()[d] : 0.f;
    const float s = scale.has_value() ? scale->data_ptr<float>()[d] : 1.f;
    const float t = shift.has_value() ? shift->data_ptr<float>()[d] : 0.f;
    a[d] = s;
    c[d] = b * s + t;
  }
  auto fill = [&](auto& p) {
    p.a = a; p.c = c;
    p.affine = bias.has_value() || scale.has_value() || shift.has_value();
    p.relu = relu; p.H = H; p.W = W; p.D = D;
  };
  if (dtype == at::kFloat) {
    Plan<float> p;
    fill(p);
    p.dst = out.data_ptr<float>();
    run(maps, hws, p);
  } else {
    Plan<uint16_t> p;
    fill(p);
    p.dst = reinterpret_cast<uint16_t*>(out.data_ptr());
    run(maps, hws, p);
  }
  return out;
}

const char* cpu_isa() { return sf_cpu::isa_name(); }
