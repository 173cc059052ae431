// Native CPU kernel of the fused post-processing (segformer_fast.ops.resize_argmax):
//   labels[b, y, x] = argmax_k bilinear(logits[b, k])(y, x),  scores[b, y, x] = that maximum
// without the (B, K, H, W) full-resolution logits. The bilinear weights are separable, so a tile of
// output columns first interpolates each *source* row it needs along W for all K classes (a
// (K, XT) fp32 block, kept while consecutive output rows still use that source row: at 4x
// upsampling each one serves ~4 output rows), then every output row is two such rows blended along
// H, class by class, with a running maximum per pixel: a vectorisable loop over the tile's pixels.
//
// Arithmetic is the op's (see segformer_fast/ops/resize_argmax.py): index/weight tables from
// Python; t = l0x * v0 + l1x * v1 along W, s = l0y * t0 + l1y * t1 along H, each step rounded to
// fp32 (-ffp-contract=off: no FMA); a class replaces the running best when its score is greater,
// or is NaN while the best is not (the lowest index among equal scores; NaN wins, as
// torch.argmax). The tile loop is instantiated for AVX-512 and a portable fallback (cpu/isa.h):
// identical results. Logits fp32, bf16 or fp16, widened exactly as they are read.
#include "cpu/isa.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kTileW = 128;   // output columns per task (the two (K, 128) row blocks: 2 x 77 KB at K = 150)
constexpr int64_t kTileH = 16;    // output rows per task

SF_INLINE float ld(const float* p, int64_t i) { return p[i]; }
SF_INLINE float ld(const uint16_t* p, int64_t i) { return sf_cpu::bf16_to_f32(p[i]); }
SF_INLINE float ld(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }

template <typename T>
struct Plan {
  const T* logits;                 // (B, K, h, w) contiguous
  const int32_t *yi0, *yi1, *xi0, *xi1;   // (H,), (H,), (W,), (W,)
  const float *wy0, *wy1, *wx0, *wx1;     // same shapes
  int64_t* labels;                 // (B, H, W)
  float* scores;                   // (B, H, W) or nullptr
  int64_t B, K, h, w, H, W;
};

struct Scratch {
  std::vector<float> rows;         // 2 blocks of (K, kTileW): source rows interpolated along W
  std::vector<float> best;         // (kTileW,)
  std::vector<int32_t> idx;        // (kTileW,)
};

// Interpolates source row r of batch b along W for every class, into block (K, kTileW).
template <typename T>
SF_INLINE void horizontal(const Plan<T>& p, int64_t b, int64_t r, int64_t x0, int64_t nx, float* __restrict__ out) {
  const int32_t* __restrict__ i0 = p.xi0 + x0;
  const int32_t* __restrict__ i1 = p.xi1 + x0;
  const float* __restrict__ w0 = p.wx0 + x0;
  const float* __restrict__ w1 = p.wx1 + x0;
  for (int64_t k = 0; k < p.K; ++k) {
    const T* __restrict__ src = p.logits + ((b * p.K + k) * p.h + r) * p.w;
    float* __restrict__ o = out + k * kTileW;
    for (int64_t x = 0; x < nx; ++x) o[x] = w0[x] * ld(src, i0[x]) + w1[x] * ld(src, i1[x]);
  }
}

template <typename T>
SF_INLINE void task_impl(const Plan<T>& p, int64_t task, Scratch& s) {
  const int64_t tiles_w = (p.W + kTileW - 1) / kTileW, tiles_h = (p.H + kTileH - 1) / kTileH;
  const int64_t xt = task % tiles_w, yt = (task / tiles_w) % tiles_h, b = task / (tiles_w * tiles_h);
  const int64_t x0 = xt * kTileW, nx = std::min(kTileW, p.W - x0);
  const int64_t y0 = yt * kTileH, y1 = std::min(p.H, y0 + kTileH);
  int64_t held[2] = {-1, -1};      // the source row in each block
  float* block[2] = {s.rows.data(), s.rows.data() + p.K * kTileW};
  float* __restrict__ best = s.best.data();
  int32_t* __restrict__ idx = s.idx.data();
  for (int64_t y = y0; y < y1; ++y) {
    const int64_t r[2] = {p.yi0[y], p.yi1[y]};
    for (int j = 0; j < 2; ++j) {
      if (held[0] == r[j] || held[1] == r[j]) continue;
      // refill the block whose row this output row does not need
      const int slot = (held[0] == r[1 - j]) ? 1 : 0;
      horizontal(p, b, r[j], x0, nx, block[slot]);
      held[slot] = r[j];
    }
    const float* a = block[held[0] == r[0] ? 0 : 1];
    const float* c = block[held[0] == r[1] ? 0 : 1];
    const float l0 = p.wy0[y], l1 = p.wy1[y];
    {
      const float* __restrict__ a0 = a;
      const float* __restrict__ c0 = c;
      for (int64_t x = 0; x < nx; ++x) {
        best[x] = l0 * a0[x] + l1 * c0[x];
        idx[x] = 0;
      }
    }
    for (int64_t k = 1; k < p.K; ++k) {
      const float* __restrict__ ak = a + k * kTileW;
      const float* __restrict__ ck = c + k * kTileW;
      const int32_t kk = static_cast<int32_t>(k);
      for (int64_t x = 0; x < nx; ++x) {
        const float v = l0 * ak[x] + l1 * ck[x];
        const bool take = (v > best[x]) | ((v != v) & (best[x] == best[x]));
        best[x] = take ? v : best[x];
        idx[x] = take ? kk : idx[x];
      }
    }
    int64_t* __restrict__ lab = p.labels + (b * p.H + y) * p.W + x0;
    for (int64_t x = 0; x < nx; ++x) lab[x] = idx[x];
    if (p.scores != nullptr) {
      float* __restrict__ sc = p.scores + (b * p.H + y) * p.W + x0;
      for (int64_t x = 0; x < nx; ++x) sc[x] = best[x];
    }
  }
}

template <typename T>
SF_AVX512 void tasks_avx512(const Plan<T>& p, int64_t begin, int64_t end, Scratch& s) {
  for (int64_t t = begin; t < end; ++t) task_impl(p, t, s);
}

template <typename T>
void tasks_portable(const Plan<T>& p, int64_t begin, int64_t end, Scratch& s) {
  for (int64_t t = begin; t < end; ++t) task_impl(p, t, s);
}

template <typename T>
void run(const Plan<T>& p) {
  const bool avx512 = sf_cpu::use_avx512();
  const int64_t tasks = p.B * ((p.H + kTileH - 1) / kTileH) * ((p.W + kTileW - 1) / kTileW);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.rows.resize(2 * p.K * kTileW);
    s.best.resize(kTileW);
    s.idx.resize(kTileW);
    if (avx512) tasks_avx512(p, begin, end, s);
    else tasks_portable(p, begin, end, s);
  });
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> resize_argmax_forward(
    const torch::Tensor& logits, const torch::Tensor& yi0, const torch::Tensor& yi1, const torch::Tensor& wy0,
    const torch::Tensor& wy1, const torch::Tensor& xi0, const torch::Tensor& xi1, const torch::Tensor& wx0,
    const torch::Tensor& wx1, int64_t H, int64_t W, bool return_scores) {
  // Shapes and dtypes are checked in Python (segformer_fast/ops/resize_argmax.py) before this is
  // called; here only what the raw-pointer code relies on is asserted.
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(logits.dim() == 4 && logits.is_contiguous() &&
                  (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf),
              "resize_argmax_forward: logits must be contiguous (B, K, h, w) float32/bfloat16/float16, got ",
              logits.sizes(), " ", dtype);
  for (const auto* t : {&yi0, &yi1, &xi0, &xi1})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->numel() == (t == &yi0 || t == &yi1 ? H : W),
                "resize_argmax_forward: index tables must be contiguous int32 (H,) / (W,)");
  for (const auto* t : {&wy0, &wy1, &wx0, &wx1})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == (t == &wy0 || t == &wy1 ? H : W),
                "resize_argmax_forward: weight tables must be contiguous float32 (H,) / (W,)");
  const int64_t B = logits.size(0);
  auto labels = torch::empty({B, H, W}, logits.options().dtype(at::kLong));
  auto scores = return_scores ? torch::empty({B, H, W}, logits.options().dtype(at::kFloat))
                              : torch::empty({0}, logits.options().dtype(at::kFloat));
  auto fill = [&](auto& p) {
    p.yi0 = yi0.data_ptr<int32_t>(); p.yi1 = yi1.data_ptr<int32_t>();
    p.xi0 = xi0.data_ptr<int32_t>(); p.xi1 = xi1.data_ptr<int32_t>();
    p.wy0 = wy0.data_ptr<float>(); p.wy1 = wy1.data_ptr<float>();
    p.wx0 = wx0.data_ptr<float>(); p.wx1 = wx1.data_ptr<float>();
    p.labels = labels.data_ptr<int64_t>();
    p.scores = return_scores ? scores.data_ptr<float>() : nullptr;
    p.B = B; p.K = logits.size(1); p.h = logits.size(2); p.w = logits.size(3); p.H = H; p.W = W;
  };
  if (dtype == at::kFloat) {
    Plan<float> p;
    fill(p);
    p.logits = logits.data_ptr<float>();
    run(p);
  } else if (dtype == at::kBFloat16) {
    Plan<uint16_t> p;
    fill(p);
    p.logits = reinterpret_cast<const uint16_t*>(logits.data_ptr());
    run(p);
  } else {
    Plan<c10::Half> p;
    fill(p);
    p.logits = reinterpret_cast<const c10::Half*>(logits.data_ptr());
    run(p);
  }
  return {labels, scores};
}
