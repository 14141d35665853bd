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


@torch.library.custom_op("vllm_qe::qe_gemm_packed", mutates_args=())
def qe_gemm_packed(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    smooth: torch.Tensor | None,
    act_bits: int,
    act_absmax: torch.Tensor | None,
) -> torch.Tensor:
    """Base GEMM `Q_act(x / s) · Ŵᵀ` from the checkpoint's packed layout: `x` `[T, in]`, `packed` `[out, words]`
    -> `[T, out]` in `x.dtype` (`act_bits` 0: weight-only). CUDA: the Triton GEMM (dequantization and activation
    quantization fused); CPU: dequantizes to float32 for this call and runs `reference.base_gemm` (the oracle of
    the Triton path and the runtime's last-resort kernel)."""
    if use_triton(x):
        from vllm_qe.kernels.triton.gemm import qe_gemm

        return qe_gemm(x, packed, scale, zero, bits, group_size, smooth=smooth, act_bits=act_bits,
                       act_absmax=act_absmax).to(x.dtype)
    w = dequantize_packed(packed, scale, zero, bits, group_size, x.shape[1])
    return reference.base_gemm(x, w, smooth, act_bits, act_absmax).to(x.dtype)


@qe_gemm_packed.register_fake
def _(x, packed, scale, zero, bits, group_size, smooth, act_bits, act_absmax):
    return x.new_empty(x.shape[0], packed.shape[0])


def _pair(a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if a is None else (a, b)


@torch.library.custom_op("vllm_qe::qe_moe_int4pack", mutates_args=())
def qe_moe_int4pack(
    x: torch.Tensor,
    w13: torch.Tensor,
    sz13: torch.Tensor,
    group13: int,
    w2: torch.Tensor,
    sz2: torch.Tensor,
    group2: int,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    a13: torch.Tensor | None,
    b13: torch.Tensor | None,
    a2: torch.Tensor | None,
    b2: torch.Tensor | None,
    smooth13: torch.Tensor | None,
    smooth2: torch.Tensor | None,
) -> torch.Tensor:
    """SwiGLU MoE on CPU with every expert kept in torch's int4 layout (`w13` `[E, 2I, H/2]` uint8, `sz13`
    `[E, H/g, 2I, 2]`; `w2` `[E, H, I/2]`, `sz2` `[E, I/g, H, 2]`, see `runtime.kernels.int4pack`): one
    `runtime.kernels.int4pack_mm` per active expert and projection (torch's int4 GEMM for few tokens, dequantize +
    dense GEMM for many). `smooth13` `[E, H]` / `smooth2` `[E, I]`
    divide the expert's inputs; adapters as in `reference.fused_moe`."""
    from vllm_qe.runtime.kernels import int4pack_mm

    dt = sz13.dtype

    def gemm13(e: int, xe: torch.Tensor) -> torch.Tensor:
        xs = xe if smooth13 is None else xe.float() / smooth13[e]
        return int4pack_mm(xs.to(dt).contiguous(), w13[e], group13, sz13[e])

    def gemm2(e: int, a: torch.Tensor) -> torch.Tensor:
        xs = a if smooth2 is None else a.float() / smooth2[e]
        return int4pack_mm(xs.to(dt).contiguous(), w2[e], group2, sz2[e])

    return reference.fused_moe_with(x, gemm13, gemm2, w2.shape[1], topk_ids, topk_weights, _pair(a13, b13),
                                    _pair(a2, b2))


@qe_moe_int4pack.register_fake
def _(x, w13, sz13, group13, w2, sz2, group2, topk_ids, topk_weights, a13, b13, a2, b2, smooth13, smooth2):
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
    per-expert smoothing (inputs divided by it). The CPU path is the oracle and the runtime's last resort (3/8-bit
    experts, groups torch's int4 GEMM rejects): it dequantizes one active expert at a time, per call."""
    if use_triton(x):
        from vllm_qe.kernels.triton.moe import fused_moe_qe

        return fused_moe_qe(x, (w13_packed, w13_scale, w13_zero), (w2_packed, w2_scale, w2_zero), bits, group_size,
                            topk_ids, topk_weights, _pair(a13, b13), _pair(a2, b2), smooth13=smooth13,
                            smooth2=smooth2)
    H, inter = x.shape[1], w13_packed.shape[1] // 2

    def gemm13(e: int, xe: torch.Tensor) -> torch.Tensor:  # one active expert dequantized at a time
        w = dequantize_packed(w13_packed[e], w13_scale[e], None if w13_zero is None else w13_zero[e], bits,
                              group_size, H)
        return xe.float() @ (w if smooth13 is None else w / smooth13[e].float()).t()

    def gemm2(e: int, a: torch.Tensor) -> torch.Tensor:
        w = dequantize_packed(w2_packed[e], w2_scale[e], None if w2_zero is None else w2_zero[e], bits,
                              group_size, inter)
        return a.float() @ (w if smooth2 is None else w / smooth2[e].float()).t()

    return reference.fused_moe_with(x, gemm13, gemm2, w2_packed.shape[1], topk_ids, topk_weights, _pair(a13, b13),
                                    _pair(a2, b2))


@qe_fused_moe_packed.register_fake
def _(x, w13_packed, w13_scale, w13_zero, w2_packed, w2_scale, w2_zero, bits, group_size, topk_ids, topk_weights,
      a13, b13, a2, b2, smooth13, smooth2):
    return x.new_empty(x.shape[0], w2_packed.shape[1])
