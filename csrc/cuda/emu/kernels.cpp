// The emulated build's kernel translation unit: a CPU-only torch cannot compile .cu files, so the
// CUDA sources are compiled here as C++ (csrc/cuda/portable.cuh maps them onto csrc/cuda/emu).
#include "cuda/sra_attention.cu"
#include "cuda/conv_layernorm.cu"
#include "cuda/dwconv_gelu.cu"
#include "cuda/upsample_sum.cu"
#include "cuda/resize_argmax.cu"
#include "cuda/emu/selftest.cu"
