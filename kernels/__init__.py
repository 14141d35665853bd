"""Kernels of the QE linear/MoE layers: the torch reference (CPU serving path and test oracle) and Triton (CUDA)."""
