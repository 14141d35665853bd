"""Torch custom ops of vllm-qe: opaque to torch.compile / CUDA graphs; CPU -> torch reference, CUDA -> Triton.

The router (`|x|·Rᵀ`, then argmin) stays outside the op so tensor-parallel layers can all-reduce the partial
scores in between.
"""

from __future__ import annotations

import os

import torch

from vllm_qe.format.module import dequantize_packed
from vllm_qe.kernels import reference


def use_triton(x: torch.Tensor) -> bool:
    """CUDA tensors -> Triton; CPU -> the torch reference, unless VLLM_QE_FORCE_TRITON=1 (with TRITON_INTERPRET=1,
    how CI runs the kernels on CPU)."""
    return x.is_cuda or os.environ.get("VLLM_QE_FORCE_TRITON") == "1"


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


@torch.library.custom_op("vllm_qe::qe_linear_packed", mutates_args=())
def qe_linear_packed(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
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
    """QE linear from the checkpoint's packed layout: Triton on CUDA; on CPU it dequantizes and calls the
    reference (slow, used by tests as the oracle of the Triton path)."""
    if use_triton(x):
        from vllm_qe.kernels.triton.qe_linear import qe_linear_packed as triton_impl

        return triton_impl(x, packed, scale, zero, bits, group_size, bias, smooth, act_bits, out_splits, shared_a,
                           shared_b, routed_a, routed_b, expert_ids, act_absmax)
    w = dequantize_packed(packed, scale, zero, bits, group_size, x.shape[1])
    return reference.qe_linear(x, w, bias, act_bits=act_bits or None, smooth=smooth, out_splits=out_splits,
                               shared_a=shared_a, shared_b=shared_b, routed_a=routed_a, routed_b=routed_b,
                               expert_ids=expert_ids, act_absmax=act_absmax)


@qe_linear_packed.register_fake
def _(x, packed, scale, zero, bits, group_size, bias, smooth, act_bits, out_splits, shared_a, shared_b, routed_a,
      routed_b, expert_ids, act_absmax=None):
    return x.new_empty(x.shape[0], packed.shape[0])


def _pair(a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if a is None else (a, b)


@torch.library.custom_op("vllm_qe::qe_fused_moe", mutates_args=())
def qe_fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    a13: torch.Tensor | None,
    b13: torch.Tensor | None,
    a2: torch.Tensor | None,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """SwiGLU MoE on dequantized experts `w13` `[E, 2I, H]`, `w2` `[E, H, I]` with per-expert shared adapters
    (`a13` `[E, r13, H]`, `b13` `[E, 2I, r13]`, `a2` `[E, r2, I]`, `b2` `[E, H, r2]`). See `reference.fused_moe`."""
    return reference.fused_moe(x, w13, w2, topk_ids, topk_weights, _pair(a13, b13), _pair(a2, b2))


@qe_fused_moe.register_fake
def _(x, w13, w2, topk_ids, topk_weights, a13, b13, a2, b2):
    return x.new_empty(x.shape[0], w2.shape[1])


@torch.library.custom_op("vllm_qe::qe_fused_moe_packed", mutates_args=())
def qe_fused_moe_packed(
    x: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w13_zero: torch.Tensor | None,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    a13: torch.Tensor | None,
    b13: torch.Tensor | None,
    a2: torch.Tensor | None,
    b2: torch.Tensor | None,
    smooth13: torch.Tensor | None,
    smooth2: torch.Tensor | None,
) -> torch.Tensor:
    """The MoE op from the checkpoint's packed layout (`[E, N, words]`): Triton's grouped kernel on CUDA; on CPU it
    dequantizes and calls the reference (the oracle of the Triton path). `smooth13` `[E, H]`, `smooth2` `[E, I]`:
    per-expert smoothing (inputs divided by it)."""
    if use_triton(x):
        from vllm_qe.kernels.triton.moe import fused_moe_qe

        return fused_moe_qe(x, (w13_packed, w13_scale, w13_zero), (w2_packed, w2_scale, w2_zero), bits, group_size,
                            topk_ids, topk_weights, _pair(a13, b13), _pair(a2, b2), smooth13=smooth13,
                            smooth2=smooth2)
    w13 = dequantize_packed(w13_packed, w13_scale, w13_zero, bits, group_size, x.shape[1])
    w2 = dequantize_packed(w2_packed, w2_scale, w2_zero, bits, group_size, w13_packed.shape[1] // 2)
    if smooth13 is not None:
        w13, w2 = w13 / smooth13[:, None, :].float(), w2 / smooth2[:, None, :].float()
    return reference.fused_moe(x, w13, w2, topk_ids, topk_weights, _pair(a13, b13), _pair(a2, b2))


@qe_fused_moe_packed.register_fake
def _(x, w13_packed, w13_scale, w13_zero, w2_packed, w2_scale, w2_zero, bits, group_size, topk_ids, topk_weights,
      a13, b13, a2, b2, smooth13, smooth2):
    return x.new_empty(x.shape[0], w2_packed.shape[1])
