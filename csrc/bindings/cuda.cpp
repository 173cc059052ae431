// Python registration of the CUDA kernels of csrc/cuda, for both builds of this one file:
// - GPU (segformer_fast_cuda): nvcc-built kernels, CUDA tensors, the current CUDA stream;
// - emulated (segformer_fast_cuda_emu, -DSF_CUDA_EMULATE): the same kernel sources compiled as C++
//   and run by csrc/cuda/emu on CPU tensors (plus the emulation's settings and self-tests).
// Shapes, dtypes and devices are validated in Python (segformer_fast/kernels/cuda.py and the op)
// before these are called; the checks here guard only what the raw-pointer code relies on.
#include <torch/extension.h>

#include <string>
#include <tuple>

#include "cuda/sra_attention.h"
#include "cuda/conv_layernorm.h"
#include "cuda/dwconv_gelu.h"
#include "cuda/upsample_sum.h"
#include "cuda/resize_argmax.h"

#if defined(SF_CUDA_EMULATE)
#include "cuda/emu/selftest.h"
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

#if defined(SF_CUDA_EMULATE)
constexpr const char* kDevice = "CPU (CUDA emulation)";
bool on_device(const at::Tensor& t) { return t.device().is_cpu(); }
cudaStream_t stream_of(const at::Tensor&) { return nullptr; }
struct Guard {
  explicit Guard(const at::Tensor&) {}
};
#else
constexpr const char* kDevice = "CUDA";
bool on_device(const at::Tensor& t) { return t.device().is_cuda(); }
cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
struct Guard {
  explicit Guard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
#endif

sf_cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return sf_cuda::DType::kFloat32;
    case at::kHalf: return sf_cuda::DType::kFloat16;
    case at::kBFloat16: return sf_cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "sra_attention (cuda): expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// (B, rows, C) with channel stride 1 on this build's device, in q's dtype
void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t rows) {
  TORCH_CHECK(on_device(t), "sra_attention (cuda): ", name, " must be on ", kDevice, ", got ", t.device());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(2) == q.size(2) && (rows < 0 || t.size(1) == rows),
              "sra_attention (cuda): ", name, " has shape ", t.sizes(), ", expected (", q.size(0), ", ",
              rows < 0 ? std::string("M") : std::to_string(rows), ", ", q.size(2), ")");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "sra_attention (cuda): ", name, " has dtype ", t.scalar_type(),
              ", expected ", q.scalar_type());
  TORCH_CHECK(t.stride(2) == 1, "sra_attention (cuda): ", name, " needs channel stride 1, got ", t.stride(2));
  TORCH_CHECK(t.device() == q.device(), "sra_attention (cuda): ", name, " is on ", t.device(), ", q on ", q.device());
}

sf_cuda::SraParams params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads, double scale) {
  check_operand(q, "q", q, q.size(1));
  check_operand(k, "k", q, -1);
  check_operand(v, "v", q, k.size(1));
  const int64_t C = q.size(2);
  TORCH_CHECK(heads >= 1 && C % heads == 0 && C / heads <= 128, "sra_attention (cuda): C = ", C,
              " must split into num_heads = ", heads, " heads of at most 128 channels");
  TORCH_CHECK(k.size(1) >= 1, "sra_attention (cuda): need M >= 1 keys, got ", k.size(1));
  TORCH_CHECK(q.size(0) * heads <= 65535, "sra_attention (cuda): B * num_heads = ", q.size(0) * heads,
              " exceeds the grid limit 65535");
  TORCH_CHECK(q.numel() < (int64_t(1) << 31) && k.size(0) * k.size(1) * C < (int64_t(1) << 31),
              "sra_attention (cuda): tensors of 2^31 or more elements are not supported");
  sf_cuda::SraParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.sqb = q.stride(0); p.sqn = q.stride(1);
  p.skb = k.stride(0); p.skm = k.stride(1);
  p.svb = v.stride(0); p.svm = v.stride(1);
  p.B = int(q.size(0)); p.N = int(q.size(1)); p.M = int(k.size(1)); p.H = int(heads); p.d = int(C / heads);
  p.sm_scale = float(scale);
  p.qk_scale = float(scale * 1.4426950408889634);  // log2(e): base-2 exponentials
  return p;
}

void check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "sra_attention (cuda): ", what, " failed: ", cudaGetErrorString(e));
}

}  // namespace

// q (B, N, C), k and v (B, M, C) -> O (B, N, C) contiguous, LSE (B*heads, N) fp32 in base 2
std::tuple<at::Tensor, at::Tensor> sra_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     int64_t heads, double scale) {
  Guard guard(q);
  sf_cuda::SraParams p = params(q, k, v, heads, scale);
  at::Tensor o = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(0) * heads, q.size(1)}, q.options().dtype(at::kFloat));
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  check(sf_cuda::sra_attention_fwd(dtype_of(q), p, stream_of(q)), "forward launch");
  return {o, lse};
}

// dO (B, N, C), q, k, v, LSE from the forward -> dQ (B, N, C), dK, dV (B, M, C), contiguous
std::tuple<at::Tensor, at::Tensor, at::Tensor> sra_attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& lse, int64_t heads, double scale) {
  Guard guard(q);
  sf_cuda::SraParams p = params(q, k, v, heads, scale);
  check_operand(dout, "dO", q, q.size(1));
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.dim() == 2 && lse.size(0) == q.size(0) * heads && lse.size(1) == q.size(1),
              "sra_attention (cuda): lse must be contiguous float32 (", q.size(0) * heads, ", ", q.size(1),
              ") on ", q.device(), ", got ", lse.scalar_type(), " ", lse.sizes());
  const sf_cuda::DType dt = dtype_of(q);
  const int splits = sf_cuda::sra_attention_dkdv_splits(dt, p.B, p.N, p.M, p.H, p.d);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty({q.size(0) * heads, q.size(1)}, q.options().dtype(at::kFloat));
  at::Tensor part = at::empty({2, splits, k.size(0), k.size(1), k.size(2)}, q.options().dtype(at::kFloat));
  p.dout = dout.data_ptr();
  p.sdob = dout.stride(0); p.sdon = dout.stride(1);
  p.o = dq.data_ptr();
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.delta = delta.data_ptr<float>();
  p.dk_part = part[0].data_ptr<float>();
  p.dv_part = part[1].data_ptr<float>();
  check(sf_cuda::sra_attention_bwd(dt, p, dk.data_ptr(), dv.data_ptr(), splits, stream_of(q)), "backward launch");
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------- conv + LayerNorm
namespace {

// x (B, Cin, H, W) any strides, w_km (Cout, K) contiguous with k = (kh, kw, cin), optional (Cout,)
// vectors, all on this build's device in one dtype -> the kernels' parameters (out/dy/part unset)
sf_cuda::ConvLnParams conv_ln_params(const at::Tensor& x, const at::Tensor& w_km, int64_t kh, int64_t kw,
                                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& gamma,
                                     const c10::optional<at::Tensor>& beta, at::IntArrayRef stride,
                                     at::IntArrayRef padding, double eps) {
  TORCH_CHECK(on_device(x) && x.dim() == 4, "conv_layernorm (cuda): x must be 4D on ", kDevice, ", got ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "conv_layernorm (cuda): expected float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t Cout = w_km.size(0), Cin = x.size(1);
  TORCH_CHECK(w_km.dim() == 2 && w_km.is_contiguous() && w_km.size(1) == kh * kw * Cin &&
                  w_km.scalar_type() == x.scalar_type() && w_km.device() == x.device(),
              "conv_layernorm (cuda): w_km must be contiguous (Cout, kh*kw*Cin) = (", Cout, ", ", kh * kw * Cin,
              ") in x's dtype on x's device, got ", w_km.sizes());
  TORCH_CHECK(Cout >= 1 && Cout <= 512, "conv_layernorm (cuda): Cout = ", Cout, " not in [1, 512]");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0, "conv_layernorm (cuda): bad stride/padding");
  const int64_t Ho = (x.size(2) + 2 * padding[0] - kh) / stride[0] + 1;
  const int64_t Wo = (x.size(3) + 2 * padding[1] - kw) / stride[1] + 1;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "conv_layernorm (cuda): empty output ", Ho, " x ", Wo);
  TORCH_CHECK(x.size(0) <= 65535, "conv_layernorm (cuda): batch ", x.size(0), " exceeds the grid limit 65535");
  TORCH_CHECK(x.size(0) * Ho * Wo * Cout < (int64_t(1) << 31) && Ho * Wo < (int64_t(1) << 30),
              "conv_layernorm (cuda): outputs of 2^31 or more elements are not supported");
  const c10::optional<at::Tensor>* vecs[3] = {&bias, &gamma, &beta};
  for (const auto* v : vecs)
    if (v->has_value())
      TORCH_CHECK((*v)->is_contiguous() && (*v)->numel() == Cout && (*v)->scalar_type() == x.scalar_type() &&
                      (*v)->device() == x.device(),
                  "conv_layernorm (cuda): bias/norm vectors must be contiguous (", Cout, ",) in x's dtype");
  sf_cuda::ConvLnParams p{};
  p.x = x.data_ptr();
  p.w = w_km.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.gamma = gamma.has_value() ? gamma->data_ptr() : nullptr;
  p.beta = beta.has_value() ? beta->data_ptr() : nullptr;
  p.sxb = x.stride(0); p.sxc = x.stride(1); p.sxh = x.stride(2); p.sxw = x.stride(3);
  p.B = int(x.size(0)); p.Cin = int(Cin); p.H = int(x.size(2)); p.W = int(x.size(3));
  p.Ho = int(Ho); p.Wo = int(Wo); p.Cout = int(Cout); p.KH = int(kh); p.KW = int(kw);
  p.stride_h = int(stride[0]); p.stride_w = int(stride[1]); p.pad_h = int(padding[0]); p.pad_w = int(padding[1]);
  p.eps = float(eps);
  return p;
}

void conv_ln_check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "conv_layernorm (cuda): ", what, " failed: ", cudaGetErrorString(e));
}

}  // namespace

// x (B, Cin, H, W), w_km (Cout, kh*kw*Cin) -> tokens (B, Ho*Wo, Cout) contiguous, in x's dtype
at::Tensor conv_layernorm_fwd(const at::Tensor& x, const at::Tensor& w_km, int64_t kh, int64_t kw,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& gamma,
                              const c10::optional<at::Tensor>& beta, at::IntArrayRef stride, at::IntArrayRef padding,
                              double eps) {
  Guard guard(x);
  sf_cuda::ConvLnParams p = conv_ln_params(x, w_km, kh, kw, bias, gamma, beta, stride, padding, eps);
  at::Tensor out = at::empty({x.size(0), int64_t(p.Ho) * p.Wo, p.Cout}, x.options());
  p.out = out.data_ptr();
  conv_ln_check(sf_cuda::conv_layernorm_fwd(dtype_of(x), p, stream_of(x)), "forward launch");
  return out;
}

// dy (B, Ho*Wo, Cout) -> dz (B, Ho*Wo, Cout) in x's dtype, dvec (3, Cout) fp32 = [dbias, dgamma, dbeta]
std::tuple<at::Tensor, at::Tensor> conv_layernorm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w_km,
                                                      int64_t kh, int64_t kw, const c10::optional<at::Tensor>& bias,
                                                      const c10::optional<at::Tensor>& gamma, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, double eps) {
  Guard guard(x);
  sf_cuda::ConvLnParams p = conv_ln_params(x, w_km, kh, kw, bias, gamma, c10::nullopt, stride, padding, eps);
  TORCH_CHECK(dy.is_contiguous() && dy.scalar_type() == x.scalar_type() && dy.device() == x.device() &&
                  dy.dim() == 3 && dy.size(0) == p.B && dy.size(1) == int64_t(p.Ho) * p.Wo && dy.size(2) == p.Cout,
              "conv_layernorm (cuda): dy must be contiguous (", p.B, ", ", int64_t(p.Ho) * p.Wo, ", ", p.Cout,
              ") in x's dtype, got ", dy.sizes());
  const sf_cuda::DType dt = dtype_of(x);
  at::Tensor dz = at::empty(dy.sizes(), x.options());
  at::Tensor part = at::empty({sf_cuda::conv_layernorm_blocks(dt, p.B, p.Ho, p.Wo, p.Cout), 3, p.Cout},
                              x.options().dtype(at::kFloat));
  at::Tensor dvec = at::empty({3, p.Cout}, x.options().dtype(at::kFloat));
  p.dy = dy.data_ptr();
  p.out = dz.data_ptr();
  p.part = part.data_ptr<float>();
  conv_ln_check(sf_cuda::conv_layernorm_bwd(dt, p, dvec.data_ptr<float>(), stream_of(x)), "backward launch");
  return {dz, dvec};
}

// ---------------------------------------------------------------------------- dwconv 3x3 + GELU
namespace {

bool is_gpu_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// x (B, H*W, C) contiguous tokens on this build's device, w (C, 1, 3, 3) and bias (C,) contiguous in
// x's dtype on x's device -> the kernels' parameters (dy/out unset)
sf_cuda::DwconvParams dwconv_params(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& w,
                                    const c10::optional<at::Tensor>& bias, bool tanh) {
  TORCH_CHECK(on_device(x) && x.dim() == 3 && x.is_contiguous() && is_gpu_float(x),
              "dwconv_gelu (cuda): x must be contiguous float32/float16/bfloat16 (B, H*W, C) tokens on ", kDevice,
              ", got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  const int64_t C = x.size(2);
  TORCH_CHECK(H >= 1 && W >= 1 && H * W == x.size(1) && C >= 1, "dwconv_gelu (cuda): hw = (", H, ", ", W,
              ") does not match x ", x.sizes());
  TORCH_CHECK(w.is_contiguous() && w.numel() == 9 * C && w.scalar_type() == x.scalar_type() && w.device() == x.device(),
              "dwconv_gelu (cuda): weight must be contiguous (", C, ", 1, 3, 3) in x's dtype on x's device");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == C &&
                                    bias->scalar_type() == x.scalar_type() && bias->device() == x.device()),
              "dwconv_gelu (cuda): bias must be contiguous (", C, ",) in x's dtype on x's device");
  TORCH_CHECK(x.size(0) <= 65535 && x.numel() < (int64_t(1) << 31),
              "dwconv_gelu (cuda): batch > 65535 or 2^31 or more elements are not supported");
  sf_cuda::DwconvParams p{};
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.B = int(x.size(0)); p.H = int(H); p.W = int(W); p.C = int(C);
  p.tanh = tanh;
  return p;
}

void launch_check(cudaError_t e, const char* op, const char* what) {
  TORCH_CHECK(e == cudaSuccess, op, " (cuda): ", what, " failed: ", cudaGetErrorString(e));
}

}  // namespace

// x (B, H*W, C) -> y (B, H*W, C) = gelu(dwconv3x3(x) + bias), in x's dtype
at::Tensor dwconv_gelu_fwd(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& w,
                           const c10::optional<at::Tensor>& bias, bool tanh) {
  Guard guard(x);
  sf_cuda::DwconvParams p = dwconv_params(x, H, W, w, bias, tanh);
  at::Tensor y = at::empty(x.sizes(), x.options());
  p.out = y.data_ptr();
  launch_check(sf_cuda::dwconv_gelu_fwd(dtype_of(x), p, stream_of(x)), "dwconv_gelu", "forward launch");
  return y;
}

// dy, x (B, H*W, C) -> dx (B, H*W, C) in x's dtype, dw (C, 9) and db (C,) fp32. `rows`: backward blocks
// along the tiles (0: the launcher's default; tests force fewer to exercise the tile loop)
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_gelu_bwd(const at::Tensor& dy, const at::Tensor& x, int64_t H,
                                                               int64_t W, const at::Tensor& w,
                                                               const c10::optional<at::Tensor>& bias, bool tanh,
                                                               int64_t rows) {
  Guard guard(x);
  sf_cuda::DwconvParams p = dwconv_params(x, H, W, w, bias, tanh);
  TORCH_CHECK(dy.is_contiguous() && dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() &&
                  dy.device() == x.device(),
              "dwconv_gelu (cuda): dy must be contiguous ", x.sizes(), " in x's dtype, got ", dy.sizes());
  const int64_t dflt = sf_cuda::dwconv_gelu_partial_rows(p.B, p.H, p.W);
  rows = rows > 0 ? std::min(rows, dflt) : dflt;
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor part = at::empty({rows, 10, p.C}, x.options().dtype(at::kFloat));
  at::Tensor dw = at::empty({p.C, 9}, x.options().dtype(at::kFloat));
  at::Tensor db = at::empty({p.C}, x.options().dtype(at::kFloat));
  p.dy = dy.data_ptr();
  p.out = dx.data_ptr();
  launch_check(sf_cuda::dwconv_gelu_bwd(dtype_of(x), p, part.data_ptr<float>(), int(rows), dw.data_ptr<float>(),
                                        db.data_ptr<float>(), stream_of(x)),
               "dwconv_gelu", "backward launch");
  return {dx, dw, db};
}

// ---------------------------------------------------------------------------- upsample + sum
namespace {

// maps[k] (B, h_k*w_k, D) contiguous, one dtype, on this build's device; hws = (h_0, w_0, h_1, ...);
// bias/scale/shift (D,) in any float dtype: converted to fp32 (kept alive in `keep`)
sf_cuda::UpsampleParams upsample_params(const std::vector<at::Tensor>& maps, const std::vector<int64_t>& hws,
                                        int64_t H, int64_t W, const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& scale,
                                        const c10::optional<at::Tensor>& shift, bool relu,
                                        std::vector<at::Tensor>& keep) {
  TORCH_CHECK(!maps.empty() && maps.size() <= sf_cuda::kUpsampleMaxMaps && hws.size() == 2 * maps.size(),
              "upsample_sum (cuda): 1 to ", sf_cuda::kUpsampleMaxMaps, " maps with one (h, w) each, got ",
              maps.size(), " maps and ", hws.size(), " sizes");
  const at::Tensor& m0 = maps[0];
  TORCH_CHECK(m0.dim() == 3 && is_gpu_float(m0) && on_device(m0),
              "upsample_sum (cuda): maps must be float32/float16/bfloat16 (B, h*w, D) tokens on ", kDevice);
  TORCH_CHECK(H >= 1 && W >= 1 && m0.size(0) <= 65535 && m0.size(0) * H * W * m0.size(2) < (int64_t(1) << 31),
              "upsample_sum (cuda): bad output size or 2^31 or more elements");
  sf_cuda::UpsampleParams p{};
  p.n_maps = int(maps.size());
  for (size_t k = 0; k < maps.size(); ++k) {
    const at::Tensor& m = maps[k];
    TORCH_CHECK(m.is_contiguous() && m.dim() == 3 && m.scalar_type() == m0.scalar_type() &&
                    m.device() == m0.device() && m.size(0) == m0.size(0) && m.size(2) == m0.size(2) &&
                    hws[2 * k] >= 1 && hws[2 * k + 1] >= 1 && m.size(1) == hws[2 * k] * hws[2 * k + 1],
                "upsample_sum (cuda): maps[", k, "] must be contiguous (", m0.size(0), ", ", hws[2 * k], "*",
                hws[2 * k + 1], ", ", m0.size(2), ") like maps[0], got ", m.sizes());
    p.maps[k] = m.data_ptr();
    p.h[k] = int(hws[2 * k]);
    p.w[k] = int(hws[2 * k + 1]);
  }
  const int64_t D = m0.size(2);
  const float* vec[3] = {nullptr, nullptr, nullptr};
  const c10::optional<at::Tensor>* given[3] = {&bias, &scale, &shift};
  for (int i = 0; i < 3; ++i) {
    if (!given[i]->has_value()) continue;
    const at::Tensor& t = given[i]->value();
    TORCH_CHECK(t.numel() == D && t.is_floating_point() && t.device() == m0.device(),
                "upsample_sum (cuda): bias/scale/shift must be (", D, ",) on the maps' device");
    keep.push_back(t.to(at::kFloat).contiguous());
    vec[i] = keep.back().data_ptr<float>();
  }
  p.bias = vec[0]; p.scale = vec[1]; p.shift = vec[2];
  p.B = int(m0.size(0)); p.H = int(H); p.W = int(W); p.D = int(D);
  p.relu = relu;
  return p;
}

}  // namespace

// maps -> tokens (B, H*W, D) in the maps' dtype: relu((sum_k up(map_k) + bias) * scale + shift)
at::Tensor upsample_sum_fwd(const std::vector<at::Tensor>& maps, const std::vector<int64_t>& hws, int64_t H,
                            int64_t W, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                            const c10::optional<at::Tensor>& shift, bool relu) {
  TORCH_CHECK(!maps.empty(), "upsample_sum (cuda): no maps");
  Guard guard(maps[0]);
  std::vector<at::Tensor> keep;
  sf_cuda::UpsampleParams p = upsample_params(maps, hws, H, W, bias, scale, shift, relu, keep);
  at::Tensor out = at::empty({p.B, H * W, p.D}, maps[0].options());
  p.out = out.data_ptr();
  launch_check(sf_cuda::upsample_sum_fwd(dtype_of(maps[0]), p, stream_of(maps[0])), "upsample_sum", "forward launch");
  return out;
}

// grad (B, H*W, D) -> dz (B, H*W, D) fp32 = d out / d(sum of maps), and fp32 (D,) dbias, dscale, dshift
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> upsample_sum_epilogue_bwd(
    const at::Tensor& grad, const std::vector<at::Tensor>& maps, const std::vector<int64_t>& hws, int64_t H, int64_t W,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, bool relu) {
  TORCH_CHECK(!maps.empty(), "upsample_sum (cuda): no maps");
  Guard guard(maps[0]);
  std::vector<at::Tensor> keep;
  sf_cuda::UpsampleParams p = upsample_params(maps, hws, H, W, bias, scale, shift, relu, keep);
  TORCH_CHECK(grad.is_contiguous() && grad.scalar_type() == maps[0].scalar_type() && grad.device() == maps[0].device() &&
                  grad.dim() == 3 && grad.size(0) == p.B && grad.size(1) == H * W && grad.size(2) == p.D,
              "upsample_sum (cuda): grad must be contiguous (", p.B, ", ", H * W, ", ", p.D, ") in the maps' dtype, got ",
              grad.sizes());
  const sf_cuda::DType dt = dtype_of(maps[0]);
  at::Tensor dz = at::empty(grad.sizes(), grad.options().dtype(at::kFloat));
  at::Tensor part = at::empty({sf_cuda::upsample_sum_partial_rows(dt, p), 3, p.D}, dz.options());
  at::Tensor dvec = at::empty({3, p.D}, dz.options());
  p.grad = grad.data_ptr();
  p.out = dz.data_ptr();
  launch_check(sf_cuda::upsample_sum_epilogue_bwd(dt, p, part.data_ptr<float>(), dvec.data_ptr<float>(),
                                                  stream_of(grad)),
               "upsample_sum", "epilogue backward launch");
  return {dz, dvec[0].clone(), dvec[1].clone(), dvec[2].clone()};  // outputs must not alias
}

// dz (B, H*W, D) (fp32 or a map's dtype) -> the gradient (B, h*w, D) in `dtype` of a map (h, w) upsampled
// to (H, W): the adjoint along W (to (B, H, w, D), fp32 unless it is the last pass), then along H
at::Tensor upsample_adjoint(const at::Tensor& dz, int64_t h, int64_t w, int64_t H, int64_t W, at::ScalarType dtype) {
  Guard guard(dz);
  TORCH_CHECK(on_device(dz) && dz.is_contiguous() && dz.dim() == 3 && is_gpu_float(dz) && dz.size(1) == H * W &&
                  h >= 1 && w >= 1 && dz.size(0) <= 65535 && dz.numel() < (int64_t(1) << 31),
              "upsample_sum (cuda): dz must be contiguous float (B, ", H, "*", W, ", D) on ", kDevice, ", got ",
              dz.sizes());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "upsample_sum (cuda): gradient dtype must be float32, float16 or bfloat16, got ", dtype);
  const int64_t B = dz.size(0), D = dz.size(2);
  at::Tensor t = dz;
  if (w != W) {
    at::Tensor next = at::empty({B, H * w, D}, dz.options().dtype(h != H ? at::kFloat : dtype));
    launch_check(sf_cuda::upsample_adjoint_1d(dtype_of(t), dtype_of(next), t.data_ptr(), next.data_ptr(), int(B),
                                              int(H), int(W), int(w), int(D), stream_of(dz)),
                 "upsample_sum", "adjoint launch (W)");
    t = next;
  }
  if (h != H) {
    at::Tensor next = at::empty({B, h * w, D}, dz.options().dtype(dtype));
    launch_check(sf_cuda::upsample_adjoint_1d(dtype_of(t), dtype_of(next), t.data_ptr(), next.data_ptr(), int(B), 1,
                                              int(H), int(h), int(w * D), stream_of(dz)),
                 "upsample_sum", "adjoint launch (H)");
    t = next;
  }
  return t.to(dtype);
}

#if defined(SF_CUDA_EMULATE)
void emu_configure(const std::string& order, int64_t seed, int64_t workers, int64_t arch) {
  sf_emu::Options o;
  o.order = order;
  o.seed = uint64_t(seed);
  o.workers = int(workers);
  o.arch = int(arch);
  sf_emu::configure(o);
}

// Runs self-test kernel `name` (csrc/cuda/emu/selftest.cu): reads `in` (float32), writes `out`.
void emu_selftest(const std::string& name, const at::Tensor& in, at::Tensor out, int64_t n, bool with_counter) {
  TORCH_CHECK(in.is_cpu() && out.is_cpu() && in.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
                  in.is_contiguous() && out.is_contiguous(),
              "emu_selftest: in and out must be contiguous float32 CPU tensors");
  int counter = 0;
  const cudaError_t e = sf_selftest::run(name.c_str(), in.data_ptr<float>(), out.data_ptr<float>(), int(n),
                                         with_counter ? &counter : nullptr, nullptr);
  TORCH_CHECK(e == cudaSuccess, "emu_selftest: unknown test or bad arguments: ", name);
}
#endif

// ---------------------------------------------------------------------------- resize + argmax
// logits (B, K, h, w) contiguous float32/float16/bfloat16; the op's int32 index and fp32 weight
// tables (H,) and (W,) -> labels (B, H, W) int64 and scores (B, H, W) fp32 (empty unless asked)
std::tuple<at::Tensor, at::Tensor> resize_argmax_fwd(const at::Tensor& logits, const at::Tensor& yi0,
                                                     const at::Tensor& yi1, const at::Tensor& wy0,
                                                     const at::Tensor& wy1, const at::Tensor& xi0,
                                                     const at::Tensor& xi1, const at::Tensor& wx0,
                                                     const at::Tensor& wx1, int64_t H, int64_t W,
                                                     bool return_scores) {
  TORCH_CHECK(on_device(logits) && logits.dim() == 4 && logits.is_contiguous() && is_gpu_float(logits),
              "resize_argmax (cuda): logits must be contiguous float32/float16/bfloat16 (B, K, h, w) on ",
              kDevice, ", got ", logits.sizes(), " ", logits.scalar_type());
  TORCH_CHECK(H >= 1 && W >= 1 && logits.size(0) <= 65535 && logits.size(0) * H * W < (int64_t(1) << 31) &&
                  logits.numel() < (int64_t(1) << 31),
              "resize_argmax (cuda): bad output size, batch over 65535 or 2^31 or more elements");
  const at::Tensor* idx[4] = {&yi0, &yi1, &xi0, &xi1};
  const at::Tensor* wts[4] = {&wy0, &wy1, &wx0, &wx1};
  for (int i = 0; i < 4; ++i) {
    const int64_t n = i < 2 ? H : W;
    TORCH_CHECK(idx[i]->scalar_type() == at::kInt && idx[i]->is_contiguous() && idx[i]->numel() == n &&
                    wts[i]->scalar_type() == at::kFloat && wts[i]->is_contiguous() && wts[i]->numel() == n &&
                    idx[i]->device() == logits.device() && wts[i]->device() == logits.device(),
                "resize_argmax (cuda): tables must be contiguous int32/float32 (H,) and (W,) on the logits' device");
  }
  Guard guard(logits);
  const int64_t B = logits.size(0);
  at::Tensor labels = at::empty({B, H, W}, logits.options().dtype(at::kLong));
  at::Tensor scores = return_scores ? at::empty({B, H, W}, logits.options().dtype(at::kFloat))
                                    : at::empty({0}, logits.options().dtype(at::kFloat));
  sf_cuda::ResizeArgmaxParams p{};
  p.logits = logits.data_ptr();
  p.yi0 = yi0.data_ptr<int>(); p.yi1 = yi1.data_ptr<int>();
  p.wy0 = wy0.data_ptr<float>(); p.wy1 = wy1.data_ptr<float>();
  p.xi0 = xi0.data_ptr<int>(); p.xi1 = xi1.data_ptr<int>();
  p.wx0 = wx0.data_ptr<float>(); p.wx1 = wx1.data_ptr<float>();
  p.labels = labels.data_ptr<int64_t>();
  p.scores = return_scores ? scores.data_ptr<float>() : nullptr;
  p.B = int(B); p.K = int(logits.size(1)); p.h = int(logits.size(2)); p.w = int(logits.size(3));
  p.H = int(H); p.W = int(W);
  launch_check(sf_cuda::resize_argmax_fwd(dtype_of(logits), p, stream_of(logits)), "resize_argmax", "launch");
  return {labels, scores};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sra_attention_fwd", &sra_attention_fwd, "spatial-reduction attention forward -> (O, LSE)");
  m.def("sra_attention_bwd", &sra_attention_bwd, "spatial-reduction attention backward -> (dQ, dK, dV)");
  m.def("conv_layernorm_fwd", &conv_layernorm_fwd, "conv + LayerNorm forward -> tokens");
  m.def("conv_layernorm_bwd", &conv_layernorm_bwd, "conv + LayerNorm backward -> (dz, [dbias, dgamma, dbeta])");
  m.def("dwconv_gelu_fwd", &dwconv_gelu_fwd, "depthwise 3x3 conv + bias + GELU forward -> y");
  m.def("dwconv_gelu_bwd", &dwconv_gelu_bwd, "depthwise 3x3 conv + bias + GELU backward -> (dx, dw (C, 9), db)");
  m.def("upsample_sum_fwd", &upsample_sum_fwd, "bilinear upsample + sum + affine + ReLU forward");
  m.def("upsample_sum_epilogue_bwd", &upsample_sum_epilogue_bwd,
        "upsample_sum epilogue backward -> (dz fp32, dbias, dscale, dshift)");
  m.def("upsample_adjoint", &upsample_adjoint, "adjoint of bilinear upsampling (separable gather)");
  m.def("resize_argmax_fwd", &resize_argmax_fwd, "bilinear resize + argmax over classes -> (labels, scores)");
#if defined(SF_CUDA_EMULATE)
  m.def("emu_configure", &emu_configure, "CUDA emulation: block order, seed, worker threads, arch",
        pybind11::arg("order") = "sequential", pybind11::arg("seed") = 0, pybind11::arg("workers") = 1,
        pybind11::arg("arch") = 80);
  m.def("emu_selftest", &emu_selftest, "CUDA emulation: run one self-test kernel");
#endif
}
