// Python registration of the native CPU kernels (module segformer_fast_cpu).
#include "cpu/ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("upsample_sum_forward", &upsample_sum_forward,
        "bilinear upsample-sum + per-channel affine + ReLU, fp32/bf16 inference (ops.upsample_sum)");
  m.def("cpu_isa", &cpu_isa, "instruction set of the next kernel call: avx512 or portable "
        "(SEGFORMER_FAST_CPU_ISA=portable forces the fallback)");
  m.def("resize_argmax_forward", &resize_argmax_forward,
        "bilinear resize + argmax over classes in one pass, labels (+ scores) (ops.resize_argmax)");
  m.def("sra_attention_bf16_forward", &sra_attention_bf16_forward,
        "many-queries few-keys attention in bf16 on AVX512-BF16 dot products (ops.sra_attention)");
  m.def("cpu_has_bf16_dot", &cpu_has_bf16_dot, "whether sra_attention_bf16_forward can run on this CPU");
}
