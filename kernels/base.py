"""The kernel interface of vllm-qe's serving layers: what a layer is (`QELayerSpec`), where it runs
(`KernelTarget`), and the two kernel kinds (`QEGemmKernel` for linear layers, `QEMoEKernel` for fused experts).

Kept free of vLLM imports at module level, so every kernel file under `kernels/` imports on a machine with torch
and Triton only (a lent GPU has no vLLM); vLLM's `MPLinearLayerConfig` is built on demand (`QELayerSpec.mp`). The
chooser that walks these classes (`can_implement` with a reason) and the vLLM glue are in
`vllm_qe/runtime/kernels.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_qe.format import spec
from vllm_qe.format.quantizer import fake_quantize_activation


@dataclass(frozen=True)
class KernelTarget:
    """Where the layer runs: `device` "cpu" or "cuda"; `capability` the CUDA compute capability as `10*major +
    minor` (None: the current device's); `cpu_features` (CPU only, None: this machine's, `cpu_features()`): the
    facts a CPU kernel is chosen on, e.g. `frozenset({"zen", "zentorch", "amx"})`."""

    device: str
    capability: int | None = None
    cpu_features: frozenset[str] | None = None

    @classmethod
    def of(cls, t: torch.Tensor) -> KernelTarget:
        return cls("cuda" if t.is_cuda else "cpu")

    def cpu_features_here(self) -> frozenset[str]:
        """`cpu_features` if given, else this machine's."""
        return cpu_features() if self.cpu_features is None else self.cpu_features

    def has(self, feature: str) -> bool:
        """Whether a CPU target has `feature` ("amx", "zen", "zentorch", "avx512")."""
        return feature in self.cpu_features_here()


def cpu_features() -> frozenset[str]:
    """This machine's CPU facts that kernel choice depends on:
    - "amx": the CPU reports AMX tiles (`/proc/cpuinfo` flag `amx_tile`; read from the file because the plugin
      masks `torch.cpu._is_amx_tile_supported` in vLLM processes, see runtime/plugin.py);
    - "avx512": AVX-512F;
    - "zen": an AMD CPU with AVX-512 (vLLM's own test for its Zen platform, `vllm.platforms._is_amd_zen_cpu`);
    - "zentorch": AMD's `zentorch` imports and registers its int4 ops (`zentorch_dynamic_qlinear`,
      `zentorch_woq_repack_weight`)."""
    global _CPU_FEATURES
    if _CPU_FEATURES is None:
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read()
        except OSError:
            info = ""
        flags = set()
        for line in info.splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        feats = set()
        if "amx_tile" in flags:
            feats.add("amx")
        if "avx512f" in flags:
            feats.add("avx512")
        if "AuthenticAMD" in info and "avx512" in info:
            feats.add("zen")
        if zentorch_ops_available():
            feats.add("zentorch")
        _CPU_FEATURES = frozenset(feats)
    return _CPU_FEATURES


_CPU_FEATURES: frozenset[str] | None = None


def zentorch_ops_available() -> bool:
    """AMD's zentorch imports here and has the ops the W4A8 kernel calls (a wrong-torch build fails to import)."""
    try:
        import zentorch  # noqa: F401
    except (ImportError, OSError):
        return False
    ns = getattr(torch.ops, "zentorch", None)
    return ns is not None and all(hasattr(ns, op) for op in ("zentorch_dynamic_qlinear", "zentorch_woq_repack_weight"))


@dataclass(frozen=True)
class QELayerSpec:
    """What fixes a layer's base GEMM: full and per-partition shapes (`in`, `out`), the format's grid (`bits`,
    `group_size` (-1: per channel), `symmetric`), the activation quantization (`act_bits`, 0 = weight-only) and the
    activation dtype the layer computes in."""

    in_full: int
    out_full: int
    in_p: int
    out_p: int
    bits: int
    group_size: int
    symmetric: bool
    act_bits: int
    act_type: torch.dtype

    @classmethod
    def build(cls, in_full: int, out_full: int, in_p: int, out_p: int, bits: int, group_size: int,
              symmetric: bool, act_bits: int, act_dtype: torch.dtype) -> QELayerSpec:
        return cls(in_full, out_full, in_p, out_p, bits, group_size, symmetric, act_bits, act_dtype)

    @property
    def mp(self):
        """vLLM's `MPLinearLayerConfig` of this layer (imports vLLM). Grids vLLM has no scalar type for (3/2-bit)
        get a `uint4` placeholder, which `runtime.kernels.vllm_choice` rejects by `bits` before using it."""
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig
        from vllm.scalar_type import scalar_types

        wtype = vllm_weight_type(self.bits, self.symmetric)
        if wtype is None:
            wtype = scalar_types.uint4
        return MPLinearLayerConfig(full_weight_shape=(self.in_full, self.out_full),
                                   partition_weight_shape=(self.in_p, self.out_p), weight_type=wtype,
                                   act_type=self.act_type, group_size=self.group_size,
                                   zero_points=not self.symmetric)

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        a = f"A{self.act_bits}" if self.act_bits else "A16"
        return f"W{self.bits}{a} {g} {'sym' if self.symmetric else 'asym'} {str(self.act_type)[6:]}"


def vllm_weight_type(bits: int, symmetric: bool):
    """vLLM scalar type of the checkpoint's grid (`w = (q - z)·s`, `q` in `[0, 2^bits)`), or None when vLLM has no
    packed layout equal to the format's bitstream (3-bit values straddle int32 words; 2-bit: no vLLM kernel)."""
    from vllm.scalar_type import scalar_types

    return {(4, True): scalar_types.uint4b8, (4, False): scalar_types.uint4,
            (8, True): scalar_types.uint8b128, (8, False): scalar_types.uint8}.get((bits, symmetric))


class QEGemmKernel(ABC):
    """One base GEMM `y = Q_act(x / s) · Ŵᵀ` (`[T, in]` -> `[T, out]`, `x.dtype`) over a layer's checkpoint tensors
    `weight_packed` / `weight_scale` / `weight_zero_point` (repacked once in `process_weights_after_loading`).

    `fuses_act_quant`: the kernel quantizes activations itself (it receives smoothed, unquantized `x`)."""

    vllm_backed: ClassVar[bool] = False
    fuses_act_quant: ClassVar[bool] = False

    def __init__(self, c: QELayerSpec) -> None:
        self.c = c

    @classmethod
    @abstractmethod
    def can_implement(cls, c: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        raise NotImplementedError

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Base GEMM on already smoothed (and, unless `fuses_act_quant`, activation-quantized) `x` `[T, in]`."""
        raise NotImplementedError

    def forward(self, layer: torch.nn.Module, x: torch.Tensor, smooth: torch.Tensor | None,
                act_absmax: torch.Tensor | None) -> torch.Tensor:
        """Smoothing and per-token activation fake quantization in torch (float32 math, as the reference), then
        the base GEMM in `x.dtype`. Kernels that fuse them override this."""
        if smooth is None and (not self.c.act_bits or self.fuses_act_quant):
            return self.apply(layer, x)
        xs = x.float() if smooth is None else x.float() / smooth
        if self.c.act_bits and not self.fuses_act_quant:
            xs = fake_quantize_activation(xs, self.c.act_bits, act_absmax)
        return self.apply(layer, xs.to(x.dtype))


class QEMoEKernel(ABC):
    """The SwiGLU experts of one fused-MoE layer: `y[t] = Σ_j w_tj · expert_{e_tj}(x_t)` over the layer's stacked
    checkpoint tensors `w13_*` `[E, 2I, ...]` / `w2_*` `[E, H, ...]`, each expert with its optional shared adapter
    and smoothing. `c13` / `c2` describe the gate-up and down projections of one expert."""

    def __init__(self, c13: QELayerSpec, c2: QELayerSpec) -> None:
        self.c13, self.c2 = c13, c2

    @classmethod
    @abstractmethod
    def can_implement(cls, c13: QELayerSpec, c2: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack the experts once (default: keep the checkpoint's tensors)."""
        return None  # noqa: B027 (a default, not a stub)

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              adapters: tuple[torch.Tensor | None, ...], smooth: tuple[torch.Tensor | None, torch.Tensor | None]
              ) -> torch.Tensor:
        """`x` `[T, H]`, `topk_ids` / `topk_weights` `[T, k]` (local expert ids), `adapters` (A13, B13, A2, B2) or
        Nones, `smooth` (`[E, H]`, `[E, I]`) or Nones -> `[T, H]` in `x.dtype`."""
        raise NotImplementedError


def zero_data(layer: torch.nn.Module, prefix: str = "") -> torch.Tensor | None:
    z = getattr(layer, prefix + spec.WEIGHT_ZERO, None)
    return None if z is None else z.data


def drop_checkpoint_tensors(layer: torch.nn.Module, prefix: str = "") -> None:
    for suffix in (spec.WEIGHT_PACKED, spec.WEIGHT_SCALE, spec.WEIGHT_ZERO):
        if hasattr(layer, prefix + suffix):
            delattr(layer, prefix + suffix)
