"""Fused Triton kernels of autosteer-kernels (installed as ``autosteer.kernels``).

Modules here import triton lazily: importing this package costs nothing.
"""
