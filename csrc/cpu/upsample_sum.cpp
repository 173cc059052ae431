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
#include "cpu/ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
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

}  // namespace

torch::Tensor upsample_sum_forward(const std::vector<torch::Tensor>& maps, const std::vector<int64_t>& hws,
                                   int64_t H, int64_t W, const c10::optional<torch::Tensor>& bias,
                                   const c10::optional<torch::Tensor>& scale,
                                   const c10::optional<torch::Tensor>& shift, bool relu) {
  // Shapes, dtypes and devices are checked in Python (segformer_fast/ops/upsample_sum.py) before
  // this is called; here only what the raw-pointer code relies on is asserted.
  TORCH_CHECK(!maps.empty() && hws.size() == 2 * maps.size(), "upsample_sum_forward: bad arguments");
  const int64_t B = maps[0].size(0), D = maps[0].size(2);
  std::vector<const float*> src;
  std::vector<Axis> ys, xs;
  std::vector<int64_t> hs, ws;
  for (size_t i = 0; i < maps.size(); ++i) {
    TORCH_CHECK(maps[i].scalar_type() == at::kFloat && maps[i].is_contiguous(),
                "upsample_sum_forward: maps must be contiguous float32");
    src.push_back(maps[i].data_ptr<float>());
    hs.push_back(hws[2 * i]);
    ws.push_back(hws[2 * i + 1]);
    ys.push_back(make_axis(hs.back(), H));
    xs.push_back(make_axis(ws.back(), W));
  }
  auto out = torch::empty({B, H * W, D}, maps[0].options());
  float* dst = out.data_ptr<float>();
  // Fold bias/scale/shift into one per-channel affine a*x + c (exactly what the epilogue does).
  std::vector<float> a(D, 1.f), c(D, 0.f);
  const bool has_affine = bias.has_value() || scale.has_value() || shift.has_value();
  for (int64_t d = 0; d < D; ++d) {
    const float b = bias.has_value() ? bias->data_ptr<float>()[d] : 0.f;
    const float s = scale.has_value() ? scale->data_ptr<float>()[d] : 1.f;
    const float t = shift.has_value() ? shift->data_ptr<float>()[d] : 0.f;
    a[d] = s;
    c[d] = b * s + t;
  }
  const size_t n_maps = maps.size();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      float* o = dst + (b * H + y) * W * D;
      for (size_t i = 0; i < n_maps; ++i) {
        const int64_t h = hs[i], w = ws[i];
        const float* base = src[i] + b * h * w * D;
        if (h == H && w == W) {  // a map already at full size passes unchanged
          const float* r = base + y * W * D;
          if (i == 0) std::copy(r, r + W * D, o);
          else for (int64_t k = 0; k < W * D; ++k) o[k] += r[k];
          continue;
        }
        const float* r0 = base + ys[i].i0[y] * w * D;
        const float* r1 = base + ys[i].i1[y] * w * D;
        const float wy0 = ys[i].w0[y], wy1 = ys[i].w1[y];
        const Axis& ax = xs[i];
        for (int64_t x = 0; x < W; ++x) {
          // __restrict__: the output row never aliases the sources, which lets the compiler
          // vectorise the channel loops
          const float* __restrict__ p00 = r0 + ax.i0[x] * D;
          const float* __restrict__ p01 = r0 + ax.i1[x] * D;
          const float* __restrict__ p10 = r1 + ax.i0[x] * D;
          const float* __restrict__ p11 = r1 + ax.i1[x] * D;
          // same association as PyTorch: h-lambda outside, w-lambda inside
          const float a00 = wy0 * ax.w0[x], a01 = wy0 * ax.w1[x];
          const float a10 = wy1 * ax.w0[x], a11 = wy1 * ax.w1[x];
          float* __restrict__ q = o + x * D;
          if (i == 0) {
            for (int64_t d = 0; d < D; ++d) q[d] = a00 * p00[d] + a01 * p01[d] + a10 * p10[d] + a11 * p11[d];
          } else {
            for (int64_t d = 0; d < D; ++d) q[d] += a00 * p00[d] + a01 * p01[d] + a10 * p10[d] + a11 * p11[d];
          }
        }
      }
      if (has_affine || relu) {
        // raw restrict pointers: through the vectors' operator[] the compiler must assume the
        // output stores may change them, and the loop stays scalar (4x slower at D = 256)
        const float* __restrict__ pa = a.data();
        const float* __restrict__ pc = c.data();
        for (int64_t x = 0; x < W; ++x) {
          float* __restrict__ q = o + x * D;
          if (relu) {
            for (int64_t d = 0; d < D; ++d) q[d] = std::max(q[d] * pa[d] + pc[d], 0.f);
          } else {
            for (int64_t d = 0; d < D; ++d) q[d] = q[d] * pa[d] + pc[d];
          }
        }
      }
    }
  });
  return out;
}
