// Runtime choice of the instruction set a native CPU kernel runs with, shared by csrc/cpu/*.cpp.
//
// Each kernel writes its inner loop once, as an always-inline template, and instantiates it twice:
// inside a function compiled for AVX-512 (``SF_AVX512``, where the compiler vectorises 16 floats
// wide) and inside a plain x86-64/any-arch function (the portable fallback). Both are compiled
// with -ffp-contract=off (kernels/cpu.py), so neither fuses a*b+c into an FMA the other lacks:
// the two paths give bit-identical results, which the tests check by forcing the fallback.
//
// SEGFORMER_FAST_CPU_ISA=portable forces the fallback (tests; a machine whose AVX-512 is slow);
// read on every call so a test can flip it within one process.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SF_HAVE_AVX512_BUILD 1
#define SF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define SF_HAVE_AVX512_BUILD 0
#define SF_AVX512
#endif
#define SF_INLINE inline __attribute__((always_inline))

namespace sf_cpu {

// Whether this call runs the AVX-512 instantiation.
inline bool use_avx512() {
  const char* env = std::getenv("SEGFORMER_FAST_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "portable") == 0) return false;
#if SF_HAVE_AVX512_BUILD
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

inline const char* isa_name() { return use_avx512() ? "avx512" : "portable"; }

// bf16 <-> fp32 as integer bit operations (bf16 is the high half of an fp32): widening is exact;
// narrowing rounds to nearest even, NaN stays a quiet NaN, like c10::BFloat16. Plain integer code
// that both instantiations vectorise identically (no VCVTNEPS2BF16: it flushes denormals).
SF_INLINE float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

SF_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return nan ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(rounded);
}

}  // namespace sf_cpu
