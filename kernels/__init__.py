"""Triton kernels, one module per op (installed as fastlm.kernels): launchers, no autograd or dispatch."""
