// CUDA emulation, host side: the few runtime types and calls a launcher in csrc/cuda uses, so that
// the same launcher source builds with nvcc (real CUDA runtime) and with g++ (this emulation).
//
// A launch runs the grid's blocks one after another (or shuffled, or across worker threads), each
// block's threads as user-space fibers (see runtime.cpp). Whatever the GPU would reject or leave
// undefined (launch limits, > 48 KB dynamic shared memory without the opt-in, a divergent
// __syncthreads, a shuffle from a lane outside the mask, a device assert, a deadlock) is thrown as
// std::runtime_error naming block, thread and source line; pybind11 turns it into RuntimeError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
typedef struct sf_emu_stream* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

const char* cudaGetErrorString(cudaError_t error);
// Launch problems throw (see above), so there is never a pending error to report.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

namespace sf_emu {

struct Options {
  std::string order = "sequential";  // block order: "sequential" | "reverse" | "shuffled"
  uint64_t seed = 0;                 // for "shuffled" (blocks, and warps inside each block)
  int workers = 1;                   // OS threads running blocks concurrently
  int arch = 80;                     // compute capability whose limits are enforced (70..90)
};
void configure(const Options& options);
Options options();

// Largest dynamic shared memory a block may opt in to on ``arch`` (cudaDevAttrMaxSharedMemoryPerBlockOptin).
int max_dynamic_smem_optin(int arch);
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);

// Runs ``body`` once per thread of every block of the grid (see runtime.cpp).
void launch_impl(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                 const std::function<void()>& body);

// kernel<<<grid, block, smem, stream>>>(args...): arguments are converted to the kernel's parameter
// types once, as the CUDA runtime does, and every thread calls the kernel with its own copies.
template <class... P, class... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t,
                   A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  launch_impl(reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem,
              [&] { std::apply(kernel, params); });
  return cudaSuccess;
}

}  // namespace sf_emu

template <class... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return sf_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}
