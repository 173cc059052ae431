// Vector access along the contiguous channel dim, shared by the element-wise-style kernels
// (dwconv_gelu.cu, upsample_sum.cu): V consecutive values of T as one aligned struct, which nvcc
// turns into one 4/8/16-byte load or store (ld.global.v4.u32 for 16 bytes). Callers guarantee the
// alignment (the launchers pick V > 1 only when every pointer and the row length allow it).
#pragma once

#include "cuda/portable.cuh"

namespace sf_cuda {

template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <class T, int V>
SF_DEVICE Pack<T, V> ld_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <class T, int V>
SF_DEVICE void st_pack(T* p, const Pack<T, V>& val) {
  *reinterpret_cast<Pack<T, V>*>(p) = val;
}
// V values as fp32 (acc) <- T
template <class T, int V>
SF_DEVICE void ld_float(float (&out)[V], const T* p) {
  const Pack<T, V> val = ld_pack<T, V>(p);
#pragma unroll
  for (int v = 0; v < V; ++v) out[v] = sf_to_float(val.v[v]);
}
template <class T, int V>
SF_DEVICE void st_float(T* p, const float (&in)[V]) {
  Pack<T, V> val;
#pragma unroll
  for (int v = 0; v < V; ++v) val.v[v] = sf_from_float<T>(in[v]);
  st_pack<T, V>(p, val);
}

// fp32 arithmetic that the compiler must not contract into FMAs (index math that has to round
// exactly as PyTorch's CPU code does).
#if defined(__CUDACC__)
SF_DEVICE float add_rn(float a, float b) { return __fadd_rn(a, b); }
SF_DEVICE float mul_rn(float a, float b) { return __fmul_rn(a, b); }
#else
SF_DEVICE float add_rn(float a, float b) { return a + b; }
SF_DEVICE float mul_rn(float a, float b) { return a * b; }
#endif

}  // namespace sf_cuda
