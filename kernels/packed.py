"""Kernels on the checkpoint's own packed layout (`weight_packed` `[out, words]`, any bits): the ops
`vllm_qe::qe_gemm_packed` (linear) and `vllm_qe::qe_fused_moe_packed` (MoE), opaque to torch.compile / CUDA graphs,
and the kernel classes that serve with them. CUDA: the project's Triton kernels (kernels/triton/); CPU: per-call
dequantization + the torch reference (`kernels.reference`, the oracle of the Triton path and the last resort).

The router (`|x|·Rᵀ`, then argmin) stays outside the op so tensor-parallel layers can all-reduce the partial
scores in between.
"""

from __future__ import annotations

import os

import torch

from vllm_qe.format import spec
from vllm_qe.format.module import dequantize_packed
from vllm_qe.kernels import reference
from vllm_qe.kernels.adapters import pair as _pair
from vllm_qe.kernels.base import KernelTarget, QEGemmKernel, QELayerSpec, QEMoEKernel, zero_data


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


class _PackedOpKernel(QEGemmKernel):
    """The `vllm_qe::qe_gemm_packed` op on the checkpoint's own tensors; smoothing and activation quantization fused."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        pass

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.forward(layer, x, None, None)

    def forward(self, layer: torch.nn.Module, x: torch.Tensor, smooth: torch.Tensor | None,
                act_absmax: torch.Tensor | None) -> torch.Tensor:
        return qe_gemm_packed(x, layer.weight_packed, layer.weight_scale, zero_data(layer), self.c.bits,
                                  self.c.group_size, smooth, self.c.act_bits, act_absmax)


class TritonGemmKernel(_PackedOpKernel):
    """kernels/triton/gemm.py `qe_gemm`: in-kernel dequantization of the bitstream (any bits), fused activation
    quantization. Not runnable on this project's CPU machines (no GPU); its numerics are tested with the
    Triton interpreter."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Scales and zero points to the N-major layout once (`gemm.kernel_layout`: same values and shape, N
        unit-stride), so a tile's per-group scale loads are contiguous (vectorized: docs/benchmarks/static-sm90.md)."""
        from vllm_qe.kernels.triton.gemm import kernel_layout  # imports Triton: CUDA only

        scale, zero = kernel_layout(layer.weight_scale.data, zero_data(layer))
        layer.weight_scale.data = scale
        if zero is not None:
            getattr(layer, spec.WEIGHT_ZERO).data = zero

    @classmethod
    def can_implement(cls, c: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        if target.device != "cuda":
            return False, "CUDA only"
        if c.act_type not in (torch.float16, torch.bfloat16, torch.float32):
            return False, f"activation dtype {c.act_type}"
        return True, None


class ReferenceKernel(_PackedOpKernel):
    """Last resort: dequantizes the packed weight to float32 on every call (never kept)."""

    @classmethod
    def can_implement(cls, c: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        return True, None


class _PackedMoEKernel(QEMoEKernel):
    """`vllm_qe::qe_fused_moe_packed` on the checkpoint's stacked tensors (one grid for both projections)."""

    def apply(self, layer, x, topk_ids, topk_weights, adapters, smooth):
        return qe_fused_moe_packed(
            x, layer.w13_weight_packed, layer.w13_weight_scale, zero_data(layer, "w13_"), layer.w2_weight_packed,
            layer.w2_weight_scale, zero_data(layer, "w2_"), self.c13.bits, self.c13.group_size, topk_ids,
            topk_weights, *adapters, *smooth)


class TritonMoEKernel(_PackedMoEKernel):
    """kernels/triton/moe.py's grouped kernel (tokens sorted by expert, in-kernel dequantization). Not runnable on
    this project's CPU machines; tested with the Triton interpreter. vLLM's Marlin / moe_wna16 int4 MoE is not
    wired (no GPU here to measure which wins)."""

    @classmethod
    def can_implement(cls, c13, c2, target):
        return (True, None) if target.device == "cuda" else (False, "CUDA only")


class ReferenceMoEKernel(_PackedMoEKernel):
    """Last resort: dequantizes one active expert at a time, per call (8-bit experts, groups torch's int4 GEMM
    rejects)."""

    @classmethod
    def can_implement(cls, c13, c2, target):
        return True, None
