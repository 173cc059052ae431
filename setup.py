"""Packaging for segformer_fast.

Importing this file must not import torch: pip evaluates it in build isolation where torch is
absent. Native code in csrc/ is compiled lazily at first use (segformer_fast/_build.py), never here.
"""
from setuptools import find_packages, setup

TEST = [
    "pytest>=8",
    "pytest-benchmark>=4",
    "hypothesis>=6",
    "transformers>=5.9",
    "triton>=3.9,<3.10; platform_system == 'Linux'",
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
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "triton": ["triton>=3.9,<3.10; platform_system == 'Linux'"],
        "native": ["ninja", "pybind11"],
        "test": TEST + ["ninja", "pybind11"],
    },
    entry_points={"console_scripts": ["segformer-fast=segformer_fast.__main__:main"]},
)
