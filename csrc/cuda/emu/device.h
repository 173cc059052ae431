// CUDA emulation, device side: what kernel code sees when csrc/cuda/portable.cuh is compiled by a
// host C++ compiler. threadIdx & co. read the current fiber's coordinates; __syncthreads, warp
// shuffles/votes/__syncwarp and the mma.sync wrapper are meetings resolved by the block scheduler
// in runtime.cpp. Every call records its source line (GCC's __builtin_LINE as a default argument),
// so errors name the line of the kernel that made the call.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/emu/runtime.h"

namespace sf_emu {

struct ThreadCtx {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
const ThreadCtx& ctx();
unsigned char* dynamic_smem();

enum ShflMode : int { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflBfly = 3 };
enum MmaKind : int { kMmaF16 = 0, kMmaBF16 = 1 };

void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
uint64_t shfl(unsigned mask, uint64_t value, int mode, unsigned b, unsigned c, const char* file, int line);
unsigned ballot(unsigned mask, bool pred, const char* file, int line);
// D (16x8 fp32) += A (16x16) * B (16x8), fp16 or bf16 operands in PTX m16n8k16 fragments.
void mma_m16n8k16(int kind, float* d, const uint32_t* a, const uint32_t* b, const char* file, int line);
[[noreturn]] void device_fail(const char* what, const char* file, int line);

template <class T>
inline T shfl_any(unsigned mask, T var, int mode, unsigned b, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type > 8 bytes");
  if (width < 1 || width > 32 || (width & (width - 1)))
    device_fail("shuffle width must be a power of 2 in [1, 32]", file, line);
  const unsigned c = (unsigned(32 - width) << 8) | (mode == kShflUp ? 0u : 0x1fu);
  uint64_t v = 0;
  std::memcpy(&v, &var, sizeof(T));
  const uint64_t r = shfl(mask, v, mode, b, c, file, line);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

}  // namespace sf_emu

#define threadIdx (::sf_emu::ctx().thread)
#define blockIdx (::sf_emu::ctx().block)
#define blockDim (::sf_emu::ctx().block_dim)
#define gridDim (::sf_emu::ctx().grid_dim)
#define warpSize 32

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  sf_emu::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  sf_emu::syncwarp(mask, file, line);
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return sf_emu::shfl_any(mask, var, sf_emu::kShflIdx, unsigned(src_lane), width, file, line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return sf_emu::shfl_any(mask, var, sf_emu::kShflUp, delta, width, file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return sf_emu::shfl_any(mask, var, sf_emu::kShflDown, delta, width, file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return sf_emu::shfl_any(mask, var, sf_emu::kShflBfly, unsigned(lane_mask), width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return sf_emu::ballot(mask, pred != 0, file, line);
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return sf_emu::ballot(mask, pred != 0, file, line) != 0;
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return sf_emu::ballot(mask, pred != 0, file, line) == mask;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); }

// fp16 / bf16 storage types with IEEE round-to-nearest-even conversions (bit-compatible with
// at::Half / at::BFloat16 and with CUDA's __half / __nv_bfloat16).
struct sf_emu_half {
  uint16_t bits;
};
struct sf_emu_bf16 {
  uint16_t bits;
};

namespace sf_emu {
inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) return u2f(sign | f2u(float(m) * 5.9604644775390625e-8f));  // subnormal: m * 2^-24
  if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}
inline uint16_t float_to_half(float f) {
  uint32_t x = f2u(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00u;                 // NaN
  if (x >= 0x477ff000u) return sign | 0x7c00u;                // >= 65520 rounds to inf
  if (x < 0x38800000u)                                         // below 2^-14: subnormal half
    return sign | uint16_t(std::nearbyint(u2f(x) * 16777216.0f));   // RNE of |f| / 2^-24
  x += 0xfffu + ((x >> 13) & 1u);                              // round to nearest even
  return sign | uint16_t((x - 0x38000000u) >> 13);             // rebias 127 -> 15
}
inline float bf16_to_float(uint16_t h) { return u2f(uint32_t(h) << 16); }
inline uint16_t float_to_bf16(float f) {
  const uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);   // quiet NaN
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
}  // namespace sf_emu
