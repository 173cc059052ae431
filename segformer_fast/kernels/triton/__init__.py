"""Triton kernels and their launchers, one op per file."""
