"""Triton kernels, one module per op: launchers, no autograd or dispatch."""
