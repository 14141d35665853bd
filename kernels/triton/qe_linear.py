"""The whole QE linear layer on CUDA: low-bit GEMM + shared expert + routed experts (+ bias), from packed weights."""

from __future__ import annotations

import torch

from vllm_qe.kernels.triton.gemm import qe_gemm
from vllm_qe.kernels.triton.lora import lowrank_add_


def qe_linear_packed(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
    group_size: int, bias: torch.Tensor | None, smooth: torch.Tensor | None, act_bits: int, out_splits: list[int],
    shared_a: torch.Tensor | None, shared_b: torch.Tensor | None, routed_a: torch.Tensor | None,
    routed_b: torch.Tensor | None, expert_ids: torch.Tensor | None, act_absmax: torch.Tensor | None = None,
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Same contract as `reference.qe_linear` (shapes there), reading `packed` `[N, P]` int32 directly."""
    y = qe_gemm(x, packed, scale, zero, bits, group_size, smooth=smooth, act_bits=act_bits, act_absmax=act_absmax,
                block=block)
    n = len(out_splits)
    o0 = 0
    zeros = None
    for g, width in enumerate(out_splits):
        yg = y[:, o0:o0 + width]
        if shared_a is not None:
            r = shared_a.shape[0] // n
            if zeros is None:
                zeros = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
            lowrank_add_(yg, x, shared_a[g * r:(g + 1) * r].unsqueeze(0), shared_b[o0:o0 + width].unsqueeze(0), zeros)
        if routed_a is not None:
            e = routed_a.shape[0] // n
            lowrank_add_(yg, x, routed_a[g * e:(g + 1) * e], routed_b[:, o0:o0 + width], expert_ids[:, g])
        o0 += width
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
