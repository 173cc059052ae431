"""Models of cost: FLOP/traffic per op (reference sequence vs fused kernel), ahead-of-time
compile reports for the Triton kernels (registers, spills, shared memory on sm_80/sm_90)."""
