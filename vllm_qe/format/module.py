"""One quantized linear module as tensors: encode for the checkpoint, decode back to float math."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vllm_qe.format import spec
from vllm_qe.format.packing import pack, unpack
from vllm_qe.format.quantizer import dequantize


def zero_points(scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """float32 zero points `[out, G]`: the stored ones, or `2^(bits-1)` for a symmetric scheme (`zero` None)."""
    return torch.full_like(scale, 2 ** (bits - 1), dtype=torch.float32) if zero is None else zero.float()


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                      group_size: int, in_features: int) -> torch.Tensor:
    """float32 `[..., out, in]` weight straight from the checkpoint tensors `[..., out, words]` / `[..., out, G]`
    (`zero` None = symmetric); leading dimensions (MoE experts) are kept."""
    g = scale.shape[-1]
    w = dequantize(unpack(packed.reshape(-1, packed.shape[-1]), bits, in_features), scale.reshape(-1, g).float(),
                   zero_points(scale, zero, bits).reshape(-1, g), group_size)
    return w.reshape(*packed.shape[:-1], in_features)


@dataclass
class QuantizedLinear:
    """A quantized linear layer `y = x·Ŵᵀ + adapters`, with shapes as in docs/checkpoint-format.md.

    `qweight` int32 `[out, in]` (unpacked integers), `scale` float32 `[out, G]`, `zero` float32 `[out, G]`,
    optional `smooth` `[in]`, `shared_a` `[r_s, in]`, `shared_b` `[out, r_s]`, `routed_a` `[E, r_r, in]`,
    `routed_b` `[E, out, r_r]`, `router` `[E, in]`.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    smooth: torch.Tensor | None = None
    shared_a: torch.Tensor | None = None
    shared_b: torch.Tensor | None = None
    routed_a: torch.Tensor | None = None
    routed_b: torch.Tensor | None = None
    router: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # type: ignore[return-value]

    def dequantized_weight(self) -> torch.Tensor:
        """float32 `[out, in]`: the weight as the base GEMM sees it, smoothing folded back out
        (`Ŵ_s · diag(1/s)`), so that `x · result^T` equals the base GEMM on unsmoothed `x` without act quant."""
        w = dequantize(self.qweight, self.scale, self.zero, self.group_size)
        return w if self.smooth is None else w / self.smooth.float()

    def as_stored(self) -> QuantizedLinear:
        """This module with its adapters and router rounded to the stored dtype (float16), as float32: what a
        reader of the checkpoint gets back, so calibration propagates and reports what is served."""
        def rounded(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(spec.ADAPTER_DTYPE).float()

        return replace(self, shared_a=rounded(self.shared_a), shared_b=rounded(self.shared_b),
                                   routed_a=rounded(self.routed_a), routed_b=rounded(self.routed_b),
                                   router=rounded(self.router))

    def optional_tensors(self) -> dict[str, torch.Tensor]:
        """Suffix -> tensor of the optional parts this module has (smoothing vector, adapters, router)."""
        optional = {
            spec.SMOOTH_SCALE: self.smooth, spec.SHARED_A: self.shared_a, spec.SHARED_B: self.shared_b,
            spec.ROUTED_A: self.routed_a, spec.ROUTED_B: self.routed_b, spec.ROUTER: self.router,
        }
        return {k: v for k, v in optional.items() if v is not None}

    def stored_scheme(self, declared: spec.ModuleScheme) -> spec.ModuleScheme:
        """The scheme `to_tensors` realises (`spec.stored_scheme`): `declared` with this module's smoothing and
        adapter ranks."""
        return spec.stored_scheme(declared, {k: tuple(v.shape) for k, v in self.optional_tensors().items()})

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Checkpoint tensors `{f"{name}.{suffix}": tensor}` in the format's dtypes."""
        out_f, in_f = self.shape
        t = {
            spec.WEIGHT_PACKED: pack(self.qweight, self.bits),
            spec.WEIGHT_SCALE: self.scale.to(torch.float16),
            spec.WEIGHT_SHAPE: torch.tensor([out_f, in_f], dtype=torch.int64),
        }
        if not self.symmetric:
            t[spec.WEIGHT_ZERO] = self.zero.to(torch.uint8)
        t.update({k: v.to(spec.ADAPTER_DTYPE if k in spec.ADAPTER_SUFFIXES else torch.float32).clone().contiguous()
                  for k, v in self.optional_tensors().items()})
        return {f"{name}.{k}": v.contiguous() for k, v in t.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], scheme: spec.ModuleScheme) -> QuantizedLinear:
        """Inverse of `to_tensors` (keys are suffixes); the caller validates first."""
        out_f, in_f = (int(v) for v in tensors[spec.WEIGHT_SHAPE])
        w = scheme.weight
        scale = tensors[spec.WEIGHT_SCALE].float()
        zero = zero_points(scale, None if w.symmetric else tensors[spec.WEIGHT_ZERO], w.bits)

        def opt(k: str) -> torch.Tensor | None:
            return tensors[k].float() if k in tensors else None

        return cls(
            qweight=unpack(tensors[spec.WEIGHT_PACKED], w.bits, in_f), scale=scale, zero=zero, bits=w.bits,
            group_size=w.group_size, symmetric=w.symmetric, smooth=opt(spec.SMOOTH_SCALE),
            shared_a=opt(spec.SHARED_A), shared_b=opt(spec.SHARED_B), routed_a=opt(spec.ROUTED_A),
            routed_b=opt(spec.ROUTED_B), router=opt(spec.ROUTER),
        )
