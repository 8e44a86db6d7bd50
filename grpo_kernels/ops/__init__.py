"""Triton kernels, one module per op, each with its autograd Function and CPU fallback."""
