"""Base GEMM kernels of a QE linear layer, chosen once per layer at load (the shape of vLLM's `MPLinearKernel`).

A layer is described by vLLM's own `MPLinearLayerConfig` (the checkpoint's integer grid mapped onto vLLM's scalar
types: symmetric 4-bit -> `uint4b8`, asymmetric 4-bit -> `uint4` + zero points, 8-bit -> `uint8b128` / `uint8`)
plus what vLLM's config cannot say (3-bit / 2-bit grids, activation quantization). `choose_kernel` walks, in order:

1. `VllmMPKernel`: whatever `vllm...kernels.linear.choose_mp_linear_kernel` picks (CUDA: Machete, Marlin, ...;
   CPU: Dynamic4bit, Zentorch, CPUWNA16) for weight-only layers (on CPU also activation-quantized ones, whose
   fake quantization runs in torch before the GEMM). On CPU, CPUWNA16 is taken only with AMX: its generic path
   is ~30x slower than torch's int4 GEMM at decode sizes (measured; `VLLM_QE_CPU_KERNEL=vllm` takes it anyway). The checkpoint's tensors are already compressed-tensors'
   layout (`weight_packed` `[out, in/8]` int32, little-endian nibbles), so they are handed to vLLM as they are;
   only the zero points are repacked (uint8 `[out, G]` -> int32 `[out/8, G]`) and the scales cast to the
   activation dtype.
2. `Int4PackCPUKernel` (own, CPU): weights stay packed in torch's int4 layout (0.5 byte per weight), 2/3/4-bit
   grids held in 4 bits, any activation dtype. One opaque op (`vllm_qe::int4pack_linear`) picks by token count at
   run time: torch's `_weight_int4pack_mm_for_cpu` (a decode kernel) below `INT4_DEQUANT_MIN_TOKENS`, else the
   packed bytes dequantized in column chunks + the dense GEMM (prefill).
3. `TritonGemmKernel` (own, CUDA): the project's Triton GEMM reading the checkpoint's bitstream (3-bit, fused
   A4/A6/A8 activation quantization, shapes vLLM rejects).
4. `ReferenceKernel` (last resort): keeps the packed tensors and dequantizes per call; never a resident
   full-precision copy.

`choose_kernel(spec, KernelTarget("cuda", 90))` evaluates the CUDA choice on any machine (vLLM's chooser runs
against a CUDA platform view of the given capability), which is how the CPU tests check it.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import MPLinearKernel
from vllm.model_executor.parameter import PackedvLLMParameter

from vllm_qe.format import spec
from vllm_qe.format.packing import pack
from vllm_qe.kernels.base import (
    KernelTarget,
    QEGemmKernel,
    QELayerSpec,
    QEMoEKernel,
    vllm_weight_type,
)
from vllm_qe.kernels.int4pack_cpu import Int4PackCPUKernel, Int4PackMoEKernel
from vllm_qe.kernels.packed import ReferenceKernel, ReferenceMoEKernel, TritonGemmKernel, TritonMoEKernel

__all__ = ["KernelTarget", "QEGemmKernel", "QELayerSpec", "QEMoEKernel", "vllm_weight_type", "KERNELS",
           "MOE_KERNELS", "choose_kernel", "choose_kernel_class", "choose_moe_kernel", "log_choice"]

logger = init_logger("vllm.plugins.vllm_qe")  # under the "vllm" logger, which vLLM configures


# -- 1. vLLM's mixed-precision kernels -----------------------------------------------------------------------------
class VllmMPKernel(QEGemmKernel):
    """vLLM's own choice (`choose_mp_linear_kernel`) on the checkpoint's tensors (compressed-tensors layout)."""

    vllm_backed = True

    def __init__(self, c: QELayerSpec, target: KernelTarget | None = None) -> None:
        super().__init__(c)
        kind, why = vllm_choice(c, target or KernelTarget("cpu"))
        if kind is None:
            raise ValueError(why)
        self.inner: MPLinearKernel = kind(c.mp, spec.WEIGHT_PACKED, spec.WEIGHT_SCALE, spec.WEIGHT_ZERO)

    @property
    def name(self) -> str:
        return type(self.inner).__name__

    @classmethod
    def can_implement(cls, c: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        kind, why = vllm_choice(c, target)
        return (kind is not None), why

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        dtype = self.c.act_type
        layer.weight_scale.data = layer.weight_scale.data.to(dtype)
        zero = getattr(layer, spec.WEIGHT_ZERO, None)
        if zero is not None:  # uint8 [out, G] -> compressed-tensors int32 [out / (32/bits), G], packed along out
            bits = self.c.bits
            packed = pack(zero.data.to(torch.int32).t().contiguous(), bits).t().contiguous()
            delattr(layer, spec.WEIGHT_ZERO)
            layer.register_parameter(spec.WEIGHT_ZERO, PackedvLLMParameter(
                data=packed, input_dim=1, output_dim=0, packed_dim=0, packed_factor=32 // bits,
                weight_loader=_no_loader))
        self.inner.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.inner.apply_weights(layer, x, None)


def _no_loader(*args, **kwargs) -> None:
    raise RuntimeError("vllm-qe: repacked parameters are not reloadable")


_CPU_HALF_ONLY = {"CPUWNA16LinearKernel", "ZentorchWNA16LinearKernel"}


def vllm_choice(c: QELayerSpec, target: KernelTarget) -> tuple[type[MPLinearKernel] | None, str | None]:
    """vLLM's kernel class for this layer on `target`, or None and why not."""
    if vllm_weight_type(c.bits, c.symmetric) is None:
        return None, f"vLLM has no {c.bits}-bit {'sym' if c.symmetric else 'asym'} weight type"
    if target.device == "cuda" and c.act_bits:
        return None, f"A{c.act_bits}: activation quantization is fused only in the own Triton GEMM"
    if c.group_size != -1 and c.in_p % c.group_size:
        return None, f"input size per partition {c.in_p} is not a multiple of group_size {c.group_size}"
    from vllm.model_executor.kernels.linear import choose_mp_linear_kernel

    try:
        with _platform_view(target):
            kind = choose_mp_linear_kernel(c.mp, target.capability)
    except ValueError as e:
        return None, str(e).splitlines()[0]
    if target.device == "cpu" and kind.__name__ in _CPU_HALF_ONLY and c.act_type == torch.float32:
        # vLLM's `can_implement` accepts float32, but `cpu_gemm_wna16` has no float32 path (measured).
        return None, f"{kind.__name__} runs bf16/fp16 activations only"
    if (target.device == "cpu" and kind.__name__ == "CPUWNA16LinearKernel" and not torch.cpu._is_amx_tile_supported()
            and os.environ.get("VLLM_QE_CPU_KERNEL") != "vllm"):
        # Without AMX (off in every vLLM process here, see plugin.py) `cpu_gemm_wna16` runs its generic "vec" path:
        # 30 ms vs 0.9 ms for torch's int4 GEMM at M=1, 1536x8960 g128, one thread (benchmarks/cpu_serving.py).
        return None, "CPUWNA16 without AMX (generic path, measured ~30x slower than torch's int4 GEMM at M=1; " \
                     "VLLM_QE_CPU_KERNEL=vllm keeps it)"
    return kind, None


@contextlib.contextmanager
def _platform_view(target: KernelTarget):
    """Run vLLM's chooser as if on `target` (a CUDA device of `target.capability` on any host): patches
    `current_platform` in vLLM's kernel-selection modules. A no-op when `target` is where we run."""
    from vllm.platforms import current_platform

    here = "cuda" if current_platform.is_cuda() else "cpu" if current_platform.is_cpu() else "other"
    if target.device == here and target.capability is None:
        yield
        return
    if target.device != "cuda" or target.capability is None:
        raise ValueError(f"cannot evaluate kernels for {target} on a {here} host (give a CUDA capability)")
    view = _cuda_platform(target.capability)
    mods = [m for n, m in list(sys.modules.items()) if m is not None and (
        n.startswith("vllm.model_executor.kernels.linear") or n.startswith("vllm.model_executor.layers.quantization.utils"))
        and getattr(m, "current_platform", None) is current_platform]
    for m in mods:
        m.current_platform = view
    try:
        yield
    finally:
        for m in mods:
            m.current_platform = current_platform


def _cuda_platform(capability: int):
    from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum

    class CudaCapabilityView(Platform):
        _enum = PlatformEnum.CUDA
        device_name = "cuda"
        device_type = "cuda"

        @classmethod
        def get_device_capability(cls, device_id: int = 0) -> DeviceCapability:
            return DeviceCapability(capability // 10, capability % 10)

    return CudaCapabilityView()


# The registry: per device, kernel classes in order of preference; the first whose `can_implement` accepts a layer
# serves it. Adding a kernel = one file under kernels/ (implementation, op, kernel class) + one line here.
KERNELS: dict[str, list[type[QEGemmKernel]]] = {
    "cpu": [VllmMPKernel, Int4PackCPUKernel, ReferenceKernel],
    "cuda": [VllmMPKernel, TritonGemmKernel, ReferenceKernel],
}
MOE_KERNELS: dict[str, list[type[QEMoEKernel]]] = {
    "cpu": [Int4PackMoEKernel, ReferenceMoEKernel],
    "cuda": [TritonMoEKernel, ReferenceMoEKernel],
}


def _first(kinds: list, args: tuple, target: KernelTarget) -> tuple[type, list[str]]:
    reasons = []
    for kind in kinds:
        ok, why = kind.can_implement(*args, target)
        if ok:
            return kind, reasons
        reasons.append(f"{kind.__name__}: {why}")
    raise AssertionError("the last kernel of every registry list implements every layer")


def choose_kernel_class(c: QELayerSpec, target: KernelTarget) -> tuple[type[QEGemmKernel], list[str]]:
    """The first kernel class in `KERNELS[target.device]` that implements `c`, and why the earlier ones did not."""
    return _first(KERNELS[target.device], (c,), target)


def choose_kernel(c: QELayerSpec, target: KernelTarget) -> QEGemmKernel:
    kind, _ = choose_kernel_class(c, target)
    return kind(c, target) if kind is VllmMPKernel else kind(c)


def choose_moe_kernel_class(c13: QELayerSpec, c2: QELayerSpec, target: KernelTarget
                            ) -> tuple[type[QEMoEKernel], list[str]]:
    """The first MoE kernel class in `MOE_KERNELS[target.device]` that implements both projections, and why the
    earlier ones did not."""
    return _first(MOE_KERNELS[target.device], (c13, c2), target)


def choose_moe_kernel(c13: QELayerSpec, c2: QELayerSpec, target: KernelTarget) -> QEMoEKernel:
    return choose_moe_kernel_class(c13, c2, target)[0](c13, c2)


_LOGGED: set[tuple[str, str, str]] = set()


def log_choice(layer_kind: str, kernel: QEGemmKernel | QEMoEKernel, c: QELayerSpec) -> None:
    """Log the chosen kernel once per (layer kind, kernel, scheme)."""
    key = (layer_kind, kernel.name, c.describe())
    if key not in _LOGGED:
        _LOGGED.add(key)
        src = "vLLM" if getattr(kernel, "vllm_backed", False) else "vllm-qe"
        logger.info("vllm-qe: %s layers (%s) -> %s (%s)", layer_kind, c.describe(), kernel.name, src)
