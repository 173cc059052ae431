"""Packaging for segformer_fast.

Importing this file must not import torch: pip evaluates it in build isolation where torch is
absent. Native code in csrc/ is compiled lazily at first use (segformer_fast/_build.py), never here.
"""
from setuptools import find_packages, setup

# Triton: the kernels work with 3.6 through 3.9 (what torch 2.11-2.13 pin) and CI tests both ends.
# No upper bound: a torch CUDA wheel pins its own Triton, and this range must not fight it.
TRITON = "triton>=3.6; platform_system == 'Linux'"

TEST = [
    "pytest>=8",
    "pytest-benchmark>=4",
    "transformers>=5.9",
    "peft",             # LoRA-wrapped projections in the patch tests
    "onnx",             # ONNX export tests
    "onnxscript",
    "onnxruntime",
    TRITON,
]

setup(
    name="segformer_fast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels and drop-in modules that make SegFormer fast",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["segformer_fast", "segformer_fast.*"]),
    # torch is not pinned here on purpose: install the build that fits the machine first
    # (README), and this range accepts it instead of pulling another multi-GB wheel.
    install_requires=["torch>=2.5"],
    extras_require={
        "triton": [TRITON],
        "native": ["ninja", "pybind11"],
        "test": TEST + ["ninja", "pybind11"],
        # CPU inference engines the benchmarks compare against (python -m segformer_fast.contenders,
        # benchmarks/bench_model.py); every use skips when they are absent
        "bench": ["openvino", "onnxruntime", "onnx", "onnxscript"],
    },
    entry_points={"console_scripts": ["segformer-fast=segformer_fast.__main__:main"]},
)
