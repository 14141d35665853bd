"""Torch custom ops of vllm-qe: opaque to torch.compile / CUDA graphs; CPU -> torch reference, CUDA -> Triton.

The router (`|x|·Rᵀ`, then argmin) stays outside the op so tensor-parallel layers can all-reduce the partial
scores in between.
"""

from __future__ import annotations

import torch

from vllm_qe.kernels import reference


@torch.library.custom_op("vllm_qe::qe_linear", mutates_args=())
def qe_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    act_bits: int,
    out_splits: list[int],
    shared_a: torch.Tensor | None,
    shared_b: torch.Tensor | None,
    routed_a: torch.Tensor | None,
    routed_b: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    act_absmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x` `[T, in]` -> `[T, out]`; `act_bits` 0 means no activation quantization. See `reference.qe_linear`."""
    return reference.qe_linear(
        x, weight, bias, act_bits=act_bits or None, smooth=smooth, out_splits=out_splits, shared_a=shared_a,
        shared_b=shared_b, routed_a=routed_a, routed_b=routed_b, expert_ids=expert_ids, act_absmax=act_absmax,
    )


@qe_linear.register_fake
def _(x, weight, bias, smooth, act_bits, out_splits, shared_a, shared_b, routed_a, routed_b, expert_ids,
      act_absmax=None):
    return x.new_empty(x.shape[0], weight.shape[0])
