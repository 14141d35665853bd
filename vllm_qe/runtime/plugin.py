"""`register()`: make `quant_experts` a vLLM quantization method (idempotent; runs in every vLLM process)."""

from __future__ import annotations

import os

_REGISTERED = False


ARCH_REQ_XCOMP_PERM = 0x1023  # arch_prctl code (Linux >= 5.16): ask the kernel for an extended state component
XFEATURE_XTILEDATA = 18  # AMX tile data
SYS_ARCH_PRCTL = 158  # x86_64 syscall number


def request_amx_permission() -> bool:
    """Ask Linux for AMX tile-data permission in this process (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`); True
    when granted. Every process must ask before its first AMX instruction, else the kernel answers it with SIGILL.
    oneDNN asks for itself, vLLM's own AMX kernels (CPU attention, `int4_scaled_mm_cpu`, CPUWNA16's AMX path) do not:
    a vLLM worker whose first AMX use is one of those dies with SIGILL (measured on this project's Intel machine:
    in-process generation ran, a spawned worker died, and ran once the worker asked)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def configure_amx() -> None:
    """Make AMX safe to use in this vLLM process: on a CPU whose torch reports AMX tiles, request the permission; if
    it is refused (old kernel, a hypervisor without AMX state) or `VLLM_QE_DISABLE_AMX=1`, report no AMX tiles to
    torch (`torch.cpu._is_amx_tile_supported`), which keeps vLLM off its AMX kernels (the crash this avoids:
    SIGILL in `cpu_attention_with_kv_cache` with bf16)."""
    import torch

    if torch.cuda.is_available() or not torch.cpu._is_amx_tile_supported():
        return
    if os.environ.get("VLLM_QE_DISABLE_AMX") == "1" or not request_amx_permission():
        torch.cpu._is_amx_tile_supported = lambda: False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    configure_amx()
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from vllm_qe.format.spec import QUANT_METHOD

    if QUANT_METHOD not in QUANTIZATION_METHODS:
        from vllm_qe.runtime.config import QuantExpertsConfig

        register_quantization_config(QUANT_METHOD)(QuantExpertsConfig)
    _REGISTERED = True
