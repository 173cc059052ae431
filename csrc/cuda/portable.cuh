// The one header a kernel file in csrc/cuda includes: the same kernel source builds with nvcc for
// the GPU and with a host C++ compiler for the CPU emulation in csrc/cuda/emu (a CPU-only torch
// cannot compile .cu files, so the emulated build's .cpp translation units #include the .cu files).
//
// Kernels use plain CUDA (threadIdx, __syncthreads, __shfl_xor_sync, ...) plus these portable pieces:
//   SF_DYNAMIC_SMEM(name)        the block's dynamic shared memory as `unsigned char* name`
//   SF_LAUNCH(k, grid, block, smem, stream, args...)   k<<<grid, block, smem, stream>>>(args...),
//                                an expression whose value is the launch's cudaError_t
//   SF_ASSERT(cond)              device assert (emulation: RuntimeError naming block/thread/line)
//   sf_half, sf_bf16             16-bit float storage types; sf_to_float / sf_from_float<T>
//   sf_ld_pair(p)                two adjacent 16-bit values as one 32-bit register (low = p[0])
//   sf_pack_pair<T>(lo, hi)      two floats rounded to T, packed the same way
//   sf_mma_m16n8k16<T>(d, a, b)  warp-collective tensor-core MMA, d (16x8 fp32) += a (16x16) b (16x8),
//                                T = sf_half or sf_bf16, PTX m16n8k16 fragment layouts
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>

#define SF_DEVICE __device__ __forceinline__
#define SF_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define SF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  (kernel<<<grid, block, smem, stream>>>(__VA_ARGS__), cudaGetLastError())
#define SF_ASSERT(cond) assert(cond)

typedef __half sf_half;
typedef __nv_bfloat16 sf_bf16;

SF_DEVICE float sf_to_float(float x) { return x; }
SF_DEVICE float sf_to_float(sf_half x) { return __half2float(x); }
SF_DEVICE float sf_to_float(sf_bf16 x) { return __bfloat162float(x); }
SF_DEVICE uint16_t sf_bits(sf_half x) { return __half_as_ushort(x); }
SF_DEVICE uint16_t sf_bits(sf_bf16 x) { return __bfloat16_as_ushort(x); }
template <class T> SF_DEVICE T sf_from_float(float x);
template <> SF_DEVICE float sf_from_float<float>(float x) { return x; }
template <> SF_DEVICE sf_half sf_from_float<sf_half>(float x) { return __float2half_rn(x); }
template <> SF_DEVICE sf_bf16 sf_from_float<sf_bf16>(float x) { return __float2bfloat16_rn(x); }

template <class T>
SF_DEVICE uint32_t sf_ld_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);  // callers pass 4-byte aligned addresses
}

template <class T>
SF_DEVICE void sf_mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same<T, sf_half>::value || std::is_same<T, sf_bf16>::value, "fp16/bf16 MMA only");
  if constexpr (std::is_same<T, sf_half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

#else  // ---------------------------------------------------------------- CPU emulation
#include "cuda/emu/device.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static __shared__ variables: one copy per OS thread, shared by the fibers (threads) of the block
// that thread runs; general-dynamic TLS, so large arrays also load from a shared object.
#define __shared__ static thread_local

#define SF_DEVICE inline
#define SF_DYNAMIC_SMEM(name) unsigned char* name = ::sf_emu::dynamic_smem()
#define SF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::sf_emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
#define SF_ASSERT(cond) \
  ((cond) ? (void)0 : ::sf_emu::device_fail("device assertion `" #cond "` failed", __FILE__, __LINE__))

typedef sf_emu_half sf_half;
typedef sf_emu_bf16 sf_bf16;

SF_DEVICE float sf_to_float(float x) { return x; }
SF_DEVICE float sf_to_float(sf_half x) { return sf_emu::half_to_float(x.bits); }
SF_DEVICE float sf_to_float(sf_bf16 x) { return sf_emu::bf16_to_float(x.bits); }
SF_DEVICE uint16_t sf_bits(sf_half x) { return x.bits; }
SF_DEVICE uint16_t sf_bits(sf_bf16 x) { return x.bits; }
template <class T> SF_DEVICE T sf_from_float(float x);
template <> SF_DEVICE float sf_from_float<float>(float x) { return x; }
template <> SF_DEVICE sf_half sf_from_float<sf_half>(float x) { return sf_half{sf_emu::float_to_half(x)}; }
template <> SF_DEVICE sf_bf16 sf_from_float<sf_bf16>(float x) { return sf_bf16{sf_emu::float_to_bf16(x)}; }

template <class T>
SF_DEVICE uint32_t sf_ld_pair(const T* p) {
  static_assert(sizeof(T) == 2, "pairs of 16-bit values");
  return uint32_t(sf_bits(p[0])) | (uint32_t(sf_bits(p[1])) << 16);
}

template <class T>
SF_DEVICE void sf_mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                               const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(std::is_same<T, sf_half>::value || std::is_same<T, sf_bf16>::value, "fp16/bf16 MMA only");
  sf_emu::mma_m16n8k16(std::is_same<T, sf_half>::value ? sf_emu::kMmaF16 : sf_emu::kMmaBF16, d, a, b, file, line);
}
#endif

template <class T>
SF_DEVICE uint32_t sf_pack_pair(float lo, float hi) {
  return uint32_t(sf_bits(sf_from_float<T>(lo))) | (uint32_t(sf_bits(sf_from_float<T>(hi))) << 16);
}
template <class T>
SF_DEVICE uint32_t sf_pack_raw(T lo, T hi) {
  return uint32_t(sf_bits(lo)) | (uint32_t(sf_bits(hi)) << 16);
}
