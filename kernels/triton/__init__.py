"""Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1, which is how CI checks them)."""
