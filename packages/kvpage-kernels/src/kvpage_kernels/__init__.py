"""kvpage-kernels."""
