// Kernels that test the CUDA emulation itself (tests/test_cuda_emu.py): correct uses whose results
// are checked, and planted bugs that the emulation must catch. Plain CUDA: this file also compiles
// with nvcc (tests/test_sra_attention_cuda.py compiles every .cu under csrc/cuda).
#include <cstring>
#include <string>

#include "cuda/emu/selftest.h"
#include "cuda/portable.cuh"

namespace sf_selftest {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// out[i] = in[n - 1 - i] through shared memory; without the barrier a thread reads a slot another
// thread has not written yet (NaN poison in the emulation, stale data on a GPU).
template <bool kBarrier>
__global__ void reverse_kernel(const float* in, float* out, int n) {
  SF_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  const int i = threadIdx.x;
  s[i] = in[i];
  if (kBarrier) __syncthreads();
  out[i] = s[n - 1 - i];
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();  // a different barrier: the block splits in two
  }
  out[threadIdx.x] = 1.f;
}

__global__ void early_exit_kernel(float* out) {
  if (threadIdx.x == 5) return;  // thread 5 never reaches the barrier the others wait at
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// out[4 n + i] = (xor 5, down 3 width 8, up 2 width 16, idx 7 i mod 32) of in over one warp
__global__ void shfl_rules_kernel(const float* in, float* out) {
  const int i = threadIdx.x;
  const float x = in[i];
  out[i] = __shfl_xor_sync(kFull, x, 5);
  out[32 + i] = __shfl_down_sync(kFull, x, 3, 8);
  out[64 + i] = __shfl_up_sync(kFull, x, 2, 16);
  out[96 + i] = __shfl_sync(kFull, x, (7 * i) % 32);
  const unsigned ballot = __ballot_sync(kFull, x > 0.f);
  out[128 + i] = float(__popc(ballot));
}

// lanes 0..15 shuffle among themselves but lanes 12..15 read lanes 16..19, outside the mask
__global__ void shfl_outside_mask_kernel(const float* in, float* out) {
  const int i = threadIdx.x;
  if (i < 16) out[i] = __shfl_sync(0x0000ffffu, in[i], i + 4);
}

// lane 0 waits for lane 1 in __syncwarp while lane 1 waits at __syncthreads
__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x == 0) {
    __syncwarp(0x3u);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void assert_kernel(const float* in, float* out) {
  SF_ASSERT(in[threadIdx.x] >= 0.f);
  out[threadIdx.x] = in[threadIdx.x];
}

// out[block] = the order in which block 0's thread 0 of each block ran (an atomic ticket)
__global__ void block_order_kernel(int* counter, float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = float(atomicAdd(counter, 1));
}

// D (16x8) = A (16x16, row-major in[0:256]) B (16x8, row-major in[256:384]) with one mma.sync,
// fragments gathered by the PTX m16n8k16 layout; out[0:128] row-major.
template <class T>
__global__ void mma_kernel(const float* in, float* out) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  const float* A = in;
  const float* B = in + 256;
  uint32_t a[4], b[2];
  for (int r = 0; r < 4; ++r) {
    const int row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
    a[r] = sf_pack_pair<T>(A[row * 16 + col], A[row * 16 + col + 1]);
  }
  for (int r = 0; r < 2; ++r) b[r] = sf_pack_pair<T>(B[(2 * t + 8 * r) * 8 + g], B[(2 * t + 8 * r + 1) * 8 + g]);
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  sf_mma_m16n8k16<T>(d, a, b);
  for (int e = 0; e < 4; ++e) out[(g + (e >> 1) * 8) * 8 + 2 * t + (e & 1)] = d[e];
}

// out[i] = float(T(in[i])): the conversions kernels use
template <class T>
__global__ void convert_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = sf_to_float(sf_from_float<T>(in[i]));
}

__global__ void touch_smem_kernel(float* out) {
  SF_DYNAMIC_SMEM(smem);
  reinterpret_cast<float*>(smem)[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = reinterpret_cast<float*>(smem)[threadIdx.x];
}

}  // namespace

cudaError_t run(const char* name, const float* in, float* out, int n, int* counter, cudaStream_t stream) {
  const std::string t(name);
  if (t == "reverse") return SF_LAUNCH(reverse_kernel<true>, dim3(1), dim3(n), n * 4, stream, in, out, n);
  if (t == "reverse_no_barrier")
    return SF_LAUNCH(reverse_kernel<false>, dim3(1), dim3(n), n * 4, stream, in, out, n);
  if (t == "divergent_barrier") return SF_LAUNCH(divergent_barrier_kernel, dim3(2), dim3(128), 0, stream, out);
  if (t == "early_exit") return SF_LAUNCH(early_exit_kernel, dim3(1), dim3(64), 0, stream, out);
  if (t == "shfl_rules") return SF_LAUNCH(shfl_rules_kernel, dim3(1), dim3(32), 0, stream, in, out);
  if (t == "shfl_outside_mask") return SF_LAUNCH(shfl_outside_mask_kernel, dim3(1), dim3(32), 0, stream, in, out);
  if (t == "deadlock") return SF_LAUNCH(deadlock_kernel, dim3(1), dim3(32), 0, stream, out);
  if (t == "assert") return SF_LAUNCH(assert_kernel, dim3(3), dim3(n), 0, stream, in, out);
  if (t == "block_order") return SF_LAUNCH(block_order_kernel, dim3(n), dim3(32), 0, stream, counter, out);
  if (t == "mma_f16") return SF_LAUNCH(mma_kernel<sf_half>, dim3(1), dim3(32), 0, stream, in, out);
  if (t == "mma_bf16") return SF_LAUNCH(mma_kernel<sf_bf16>, dim3(1), dim3(32), 0, stream, in, out);
  if (t == "convert_f16") return SF_LAUNCH(convert_kernel<sf_half>, dim3((n + 127) / 128), dim3(128), 0, stream, in, out, n);
  if (t == "convert_bf16") return SF_LAUNCH(convert_kernel<sf_bf16>, dim3((n + 127) / 128), dim3(128), 0, stream, in, out, n);
  // launch limits: n bytes of dynamic smem, 64 threads; opted in to n bytes when counter != nullptr
  if (t == "smem") {
    if (counter) {
      const cudaError_t e = cudaFuncSetAttribute(touch_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, n);
      if (e != cudaSuccess) return e;
    }
    return SF_LAUNCH(touch_smem_kernel, dim3(1), dim3(64), size_t(n), stream, out);
  }
  if (t == "threads") return SF_LAUNCH(touch_smem_kernel, dim3(1), dim3(n), 4 * n, stream, out);
  return cudaErrorInvalidValue;
}

}  // namespace sf_selftest
