"""Torch twin of the int8 GEMM path (`gemm.qe_gemm` with `act_bits > 0`), in exact integer arithmetic.

`kernels/reference.py` computes `fake_quant(x / s) · Ŵᵀ` in float32; the Triton int8 path computes the same
quantity as `s_x[m] · Σ_g scale[n, g] · Σ_{k∈g} x_q[m, k] · (q[n, k] - z[n, g])` with the inner sums exact in
int32. This module evaluates that form (inner sums in int64, the epilogue in float64) so tests can hold the kernel
to float32 rounding of its epilogue, not to the looser distance between the two formulations.
"""

from __future__ import annotations

import torch

from vllm_qe.format.packing import unpack


def quantize_activations_reference(x: torch.Tensor, act_bits: int, smooth: torch.Tensor | None = None,
                                   act_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 `x_q` `[M, K]`, float32 scale `[M]`) with `x_q · scale == fake_quantize_activation(x / smooth)`."""
    qmax = 2 ** (act_bits - 1) - 1
    xf = x.float() if smooth is None else x.float() / smooth.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if act_absmax is None else act_absmax.float().reshape(-1, 1)
    scale = (amax / qmax).clamp(min=1e-12)
    return torch.clamp(torch.round(xf / scale), -qmax - 1, qmax).to(torch.int8), scale.reshape(-1)


def qe_gemm_int8_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                           bits: int, group_size: int, act_bits: int, smooth: torch.Tensor | None = None,
                           act_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """float32 `[M, N]`: the int8 path's result (`packed` `[N, P]`, `scale`/`zero` `[N, G]`, zero None =
    symmetric 2^(bits-1))."""
    M, K = x.shape
    xq, xs = quantize_activations_reference(x, act_bits, smooth, act_absmax)
    q = unpack(packed.cpu(), bits, K).long()
    gs = K if group_size == -1 else group_size
    G = scale.shape[1]
    z = torch.full((q.shape[0], G), 2 ** (bits - 1), dtype=torch.long) if zero is None else zero.cpu().long()
    y = torch.zeros(M, q.shape[0], dtype=torch.float64)
    xl = xq.cpu().long()
    for g in range(G):
        k = slice(g * gs, min((g + 1) * gs, K))
        part = xl[:, k] @ (q[:, k] - z[:, g:g + 1]).t()  # exact integers
        y += part.double() * scale.cpu()[:, g].double()[None, :]
    return (y * xs.cpu().double()[:, None]).float().to(x.device)
