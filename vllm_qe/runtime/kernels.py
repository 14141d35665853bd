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
    """vLLM's own choice (`choose_mp_linear_kernel`) on the checkpoint's tensors (compressed-tensors layout).

    On CPU, W4A8 layers run as real int8 x int4 (`fuses_act_quant`: the kernel quantizes the activations itself,
    per token, as the format's A8 scheme does); W4A16 layers never take vLLM's W4A16-as-W4A8 shortcut
    (`VLLM_CPU_INT4_W4A8`) unless `VLLM_QE_W4A16_AS_W4A8=1` (docs/benchmarks/cpu.md gives its KL cost)."""

    vllm_backed = True

    def __init__(self, c: QELayerSpec, target: KernelTarget | None = None) -> None:
        super().__init__(c)
        kind, why = vllm_choice(c, target or KernelTarget("cpu"))
        if kind is None:
            raise ValueError(why)
        self.inner: MPLinearKernel = kind(c.mp, spec.WEIGHT_PACKED, spec.WEIGHT_SCALE, spec.WEIGHT_ZERO)
        target = target or KernelTarget("cpu")
        self.cpu_w4a8 = target.device == "cpu" and wants_w4a8(c) and w4a8_fused_block(c, kind.__name__, target) is None

    @property
    def fuses_act_quant(self) -> bool:  # type: ignore[override]
        return self.cpu_w4a8

    @property
    def name(self) -> str:
        return type(self.inner).__name__ + ("(W4A8)" if self.cpu_w4a8 else "")

    @classmethod
    def can_implement(cls, c: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        kind, why = vllm_choice(c, target)
        return (kind is not None), why

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        from unittest import mock

        import vllm.envs as envs

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
        # vLLM's CPU kernels read VLLM_CPU_INT4_W4A8 (default on) to serve *every* symmetric int4 layer as W4A8:
        # set it per layer to what the checkpoint declares.
        bias = getattr(layer, "bias", None)
        bias_dtype = None if bias is None else bias.dtype
        with mock.patch.object(envs, "VLLM_CPU_INT4_W4A8", self.cpu_w4a8, create=True):
            self.inner.process_weights_after_loading(layer)
        if bias is not None and layer.bias.dtype != bias_dtype:
            # CPUWNA16's W4A8 repack casts the bias to float32 for its own fused add; QELinearMethod adds the bias
            # itself (after the adapters), in the activation dtype: a float32 bias would turn the layer's output,
            # and the residual stream after it, float32.
            layer.bias.data = layer.bias.data.to(bias_dtype)
        took = bool(getattr(layer, "use_w4a8", False) or getattr(layer, "_zentorch_da8w4", False))
        if self.cpu_w4a8 and not took:
            raise RuntimeError(f"vllm-qe: {self.name} did not take its W4A8 path for a {self.c.describe()} layer")

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """In the layer's activation dtype, input and output (vLLM's CPU kernels reject others; Qwen2-VL's vision
        tower hands its first bf16 layer float32 patches), as `Int4PackCPUKernel` does."""
        return self.inner.apply_weights(layer, x.to(self.c.act_type), None)


def _no_loader(*args, **kwargs) -> None:
    raise RuntimeError("vllm-qe: repacked parameters are not reloadable")


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
    if target.device == "cpu":
        why = cpu_policy(c, kind.__name__, target)
        if why is not None:
            return None, why
    return kind, None


# Measured on this project's 2-core Intel (AMX) machine, 1536 -> 8960 g128 bf16, 2 threads, ms per call at M = 1 /
# 8 / 32 / 128 / 512 (benchmarks/cpu_serving.py's base-GEMM table reruns it): bf16 F.linear 1.07 / 1.11 / 1.31 /
# 2.79 / 8.51; vLLM W4A8 `int4_scaled_mm_cpu` 0.28 / 0.66 / 0.92 / 2.49 / 10.1; vLLM W4A16 CPUWNA16 (AMX) 1.74 /
# 1.84 / 2.10 / 3.24 / 8.30; torch int4 GEMM 0.48 / 1.59 / 5.78 / 23.2 / 93.
def cpu_policy(c: QELayerSpec, kind: str, target: KernelTarget) -> str | None:
    """Why vLLM's CPU kernel `kind` (its class name) must not serve layer `c` on `target`, or None to take it.

    - W4A8 (`act_bits` 8, symmetric 4-bit, bf16) is taken where vLLM's kernel computes the format's A8 scheme
      itself (`w4a8_fused_block`).
    - Otherwise torch's int4 GEMM serves the layer (faster at decode than either vLLM kernel, see the figures above)
      unless `VLLM_QE_CPU_KERNEL=vllm`; then weight-only and A4/A6/A8 layers (fake-quantized in torch first) run
      vLLM's W4A16 kernel."""
    if kind in ("CPUWNA16LinearKernel", "ZentorchWNA16LinearKernel") and c.act_type != torch.bfloat16:
        # vLLM's `can_implement` accepts float32, but `cpu_gemm_wna16` has no float32 path (measured).
        return f"{kind} runs bf16 activations only here"
    w4a8 = wants_w4a8(c)
    block = w4a8_fused_block(c, kind, target) if w4a8 else None
    if w4a8 and block is None:
        return None
    if os.environ.get("VLLM_QE_CPU_KERNEL") == "vllm":
        return None
    return block or (f"{kind} for A{c.act_bits or 16}: torch's int4 GEMM is faster at decode (measured, "
                     "runtime/kernels.py; VLLM_QE_CPU_KERNEL=vllm takes vLLM's kernel)")


def wants_w4a8(c: QELayerSpec) -> bool:
    """The layer asks for int8 activations: A8, or W4A16 served as W4A8 on request (`VLLM_QE_W4A16_AS_W4A8=1`)."""
    return c.act_bits == 8 or (c.act_bits == 0 and os.environ.get("VLLM_QE_W4A16_AS_W4A8") == "1")


def w4a8_fused_block(c: QELayerSpec, kind: str, target: KernelTarget) -> str | None:
    """Why vLLM's CPU kernel `kind` cannot run layer `c` as real int8 x int4 with the format's A8 numerics, or None.

    CPUWNA16's AMX `int4_scaled_mm_cpu` quantizes each token to int8 with a float32 scale, as the format does
    (output within bf16 rounding of the format's reference, tests/test_cpu_w4a8.py); zentorch's
    `zentorch_dynamic_qlinear` rounds the per-token scale to bf16 first, so it is taken only with
    `VLLM_QE_ZENTORCH_W4A8=1`."""
    if not (c.bits == 4 and c.symmetric and c.act_type == torch.bfloat16):
        return f"{kind}: its W4A8 path is symmetric 4-bit with bf16 activations only"
    if c.in_p != c.in_full:
        return (f"{kind}: a row-parallel shard ({c.in_p} of {c.in_full} inputs) would quantize its slice with "
                "its own int8 scale; the format's scale spans the whole token")
    if kind == "CPUWNA16LinearKernel":
        if not (target.has("amx") and torch.cpu._is_amx_tile_supported()):
            return "CPUWNA16's W4A8 path (int4_scaled_mm_cpu) needs AMX, which this CPU or process lacks"
        return None
    if kind == "ZentorchWNA16LinearKernel":
        if os.environ.get("VLLM_QE_ZENTORCH_W4A8") != "1":
            return ("zentorch_dynamic_qlinear rounds the per-token activation scale to bf16, the checkpoint's "
                    "A8 scheme keeps it float32 (VLLM_QE_ZENTORCH_W4A8=1 accepts the difference)")
        return None
    return f"{kind} has no W4A8 path"


@contextlib.contextmanager
def _platform_view(target: KernelTarget):
    """Run vLLM's chooser as if on `target`: a CUDA device of `target.capability`, or a CPU with the given
    `target.cpu_features` (a Zen CPU with or without zentorch), on any host. Patches `current_platform` (and, for
    CPUs, zentorch's op check) in vLLM's kernel-selection modules. A no-op when `target` is where we run."""
    from vllm.platforms import current_platform

    here = "cuda" if current_platform.is_cuda() else "cpu" if current_platform.is_cpu() else "other"
    if target.device == here and target.capability is None and target.cpu_features is None:
        yield
        return
    if target.device == "cpu" and here == "cpu":
        zen = target.has("zen") and target.has("zentorch")
        view, patches = _zen_view(current_platform, zen), {"has_zentorch_op": lambda names: zen}
    elif target.device == "cuda" and target.capability is not None:
        view, patches = _cuda_platform(target.capability), {}
    else:
        raise ValueError(f"cannot evaluate kernels for {target} on a {here} host (give a CUDA capability)")
    mods = [m for n, m in list(sys.modules.items()) if m is not None and (
        n.startswith("vllm.model_executor.kernels.linear") or n.startswith("vllm.model_executor.layers.quantization.utils"))
        and getattr(m, "current_platform", None) is current_platform]
    saved = [(m, k, getattr(m, k)) for m in mods for k in patches if hasattr(m, k)]
    for m in mods:
        m.current_platform = view
    for m, k, _ in saved:
        setattr(m, k, patches[k])
    try:
        yield
    finally:
        for m in mods:
            m.current_platform = current_platform
        for m, k, v in saved:
            setattr(m, k, v)


def _zen_view(platform, zen: bool):
    """`platform` (this CPU's) answering `is_zen_cpu()` with `zen`."""

    class ZenView(type(platform)):
        def is_zen_cpu(self) -> bool:
            return zen

    return ZenView()


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
