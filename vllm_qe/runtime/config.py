"""`QuantExpertsConfig`: parses a v1 `quantization_config` and hands each vLLM layer its method."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from vllm_qe.format.spec import QUANT_METHOD, FormatError, ModuleScheme, QEConfig


class QuantExpertsConfig(QuantizationConfig):
    """vLLM view of a vllm-qe checkpoint. Module names start as the checkpoint's (Hugging Face) names and are
    renamed to vLLM's by `apply_vllm_mapper`."""

    def __init__(self, qe: QEConfig) -> None:
        super().__init__()
        self.qe = qe
        self.quantized: set[str] = set(qe.quantized_modules)
        self.vllm_to_ckpt: dict[str, str] = {m: m for m in qe.quantized_modules}

    def __repr__(self) -> str:
        return f"QuantExpertsConfig({self.qe.to_dict()['weight']}, act={self.qe.activation}, {len(self.quantized)} modules)"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantExpertsConfig:
        return cls(QEConfig.from_dict(config))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Add the mapped name of every module as an alias. vLLM calls this once per model class that has a mapper
        (e.g. the VLM and then its inner language model), so names seen so far are all kept."""
        for name, ckpt_name in list(self.vllm_to_ckpt.items()):
            new = hf_to_vllm_mapper._map_name(name)
            if new is not None:
                self.vllm_to_ckpt.setdefault(new, ckpt_name)
        self.quantized = set(self.vllm_to_ckpt)
        # (schemes are looked up by checkpoint name, `scheme_of`: `re:` overrides are written against those names)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Validate the whole checkpoint (`vllm_qe.format.validate`) before the engine builds, so a bad checkpoint
        fails with the file, field or tensor named (local folders only)."""
        import os

        from vllm_qe.format.spec import InvalidCheckpoint
        from vllm_qe.format.validate import validate_checkpoint

        if os.path.isdir(model_name):
            try:
                validate_checkpoint(model_name)
            except FormatError as e:
                raise InvalidCheckpoint(str(e)) from None

    def scheme_of(self, vllm_name: str) -> ModuleScheme:
        """The scheme of a quantized module known by its vLLM name: looked up under its checkpoint name, which is
        what the `overrides` keys (exact names and `re:` patterns) are written against."""
        return self.qe.module_scheme(self.vllm_to_ckpt[vllm_name])

    def checkpoint_modules(self, prefix: str) -> list[str]:
        """vLLM names of the checkpoint modules fused into the layer `prefix` ([] when it is not quantized)."""
        if prefix in self.quantized:
            return [prefix]
        head, _, proj = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(proj)
        if not shards:
            return []
        names = [f"{head}.{s}" if head else s for s in shards]
        present = [n in self.quantized for n in names]
        if any(present) and not all(present):
            missing = [n for n, p in zip(names, present) if not p]
            raise FormatError(
                f"{prefix}: fused layer mixes quantized and unquantized modules (not quantized: {missing})"
            )
        return names if all(present) else []

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            modules = self.checkpoint_modules(prefix)
            if not modules:
                return UnquantizedLinearMethod()
            from vllm_qe.runtime.linear import QELinearMethod

            schemes = [self.scheme_of(m) for m in modules]
            return QELinearMethod(self, prefix, [self.vllm_to_ckpt[m] for m in modules], schemes)
        from vllm.model_executor.layers.fused_moe import RoutedExperts

        if isinstance(layer, RoutedExperts):
            return self._moe_method(layer, prefix)
        return None

    def _moe_method(self, layer, prefix: str) -> QuantizeMethodBase:
        """`QEMoEMethod` when the checkpoint has every expert of `prefix` as per-expert modules, vLLM's unquantized
        method when it has none of them; a partial set is an error."""
        from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
            UnquantizedFusedMoEMethod,
        )

        from vllm_qe.format.spec import EXPERT_PROJS
        from vllm_qe.runtime.moe import QEMoEMethod

        names = [f"{prefix}.{e}.{p}" for e in range(layer.global_num_experts) for p in EXPERT_PROJS]
        present = [n for n in names if n in self.quantized]
        if not present:
            return UnquantizedFusedMoEMethod(layer.moe_config)
        if len(present) != len(names):
            missing = sorted(set(names) - set(present))
            raise FormatError(f"{prefix}: the checkpoint quantizes only some experts (missing {missing[:3]}...)")
        schemes = {self.scheme_of(n) for n in names}
        if len(schemes) != 1:
            raise FormatError(f"{prefix}: experts have different schemes; vLLM runs them as one fused layer")
        ckpt = self.vllm_to_ckpt[names[0]].rsplit(".", 2)[0]
        return QEMoEMethod(layer.moe_config, prefix, ckpt, schemes.pop())
