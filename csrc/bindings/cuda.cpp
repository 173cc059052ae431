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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sra_attention_fwd", &sra_attention_fwd, "spatial-reduction attention forward -> (O, LSE)");
  m.def("sra_attention_bwd", &sra_attention_bwd, "spatial-reduction attention backward -> (dQ, dK, dV)");
#if defined(SF_CUDA_EMULATE)
  m.def("emu_configure", &emu_configure, "CUDA emulation: block order, seed, worker threads, arch",
        pybind11::arg("order") = "sequential", pybind11::arg("seed") = 0, pybind11::arg("workers") = 1,
        pybind11::arg("arch") = 80);
  m.def("emu_selftest", &emu_selftest, "CUDA emulation: run one self-test kernel");
#endif
}
