// Launchers of the spatial-reduction attention kernels (csrc/cuda/sra_attention.cu): plain
// pointers, sizes and a stream, no torch. Shapes: q, dO (B, N, C); k, v (B, M, C); head h owns
// channels h*d .. (h+1)*d, d = C / H <= 128. q, k, v, dO are read through (batch stride, row
// stride) with channel stride 1 (k and v may be the column halves of one (B, M, 2C) tensor).
#pragma once

#include <cstdint>

#include "cuda/launch.h"

namespace sf_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct SraParams {
  const void* q;      // (B, N, C) strides (sqb, sqn, 1)
  const void* k;      // (B, M, C) strides (skb, skm, 1)
  const void* v;      // (B, M, C) strides (svb, svm, 1)
  const void* dout;   // (B, N, C) strides (sdob, sdon, 1), backward only
  void* o;            // forward: O (B, N, C) contiguous; backward: dQ (B, N, C) contiguous
  float* lse;         // (B*H, N) row log-sum-exp of the scaled scores, base 2
  float* delta;       // (B*H, N) fp32 workspace of the backward: rowsum(P * dP)
  float* dk_part;     // (splits, B, M, C) fp32 workspace of the backward: dK partial sums
  float* dv_part;     // (splits, B, M, C) fp32 workspace of the backward: dV partial sums
  int64_t sqb, sqn, skb, skm, svb, svm, sdob, sdon;
  int B, N, M, H, d;
  float qk_scale;     // scale * log2(e): scores in base-2 units
  float sm_scale;     // scale
  int tiles_per_split;  // dK/dV: query tiles summed by one block (set by sra_attention_bwd)
};

// Number of query chunks the dK/dV kernel splits N into (the first dimension of dk_part/dv_part).
int sra_attention_dkdv_splits(DType dtype, int B, int N, int M, int H, int d);

// Writes p.o (O) and p.lse.
cudaError_t sra_attention_fwd(DType dtype, const SraParams& p, cudaStream_t stream);

// Writes p.o (dQ), p.delta, the partial sums and dk, dv ((B, M, C) contiguous, in dtype), reducing
// the `splits` partial sums in a fixed order (deterministic; no atomics).
cudaError_t sra_attention_bwd(DType dtype, SraParams p, void* dk, void* dv, int splits, cudaStream_t stream);

}  // namespace sf_cuda
