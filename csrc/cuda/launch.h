// Host-side CUDA runtime types for launcher declarations: the real runtime API for the GPU build,
// the emulation's stand-ins (csrc/cuda/emu/runtime.h) for the CPU build (-DSF_CUDA_EMULATE).
#pragma once
#if defined(SF_CUDA_EMULATE)
#include "cuda/emu/runtime.h"
#else
#include <cuda_runtime_api.h>
#endif
