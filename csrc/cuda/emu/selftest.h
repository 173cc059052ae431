// Self-test kernels of the CUDA emulation (csrc/cuda/emu/selftest.cu), run by tests/test_cuda_emu.py.
#pragma once

#include "cuda/launch.h"

namespace sf_selftest {
// Launches the self-test kernel `name` (see selftest.cu for what each reads and writes).
cudaError_t run(const char* name, const float* in, float* out, int n, int* counter, cudaStream_t stream);
}  // namespace sf_selftest
