"""Whether this machine can run vLLM's AMX kernels (tests that assert the AMX W4A8 path was taken)."""

from __future__ import annotations


def amx_usable() -> bool:
    """The CPU reports AMX tiles and Linux grants this process AMX tile data."""
    from vllm_qe.kernels.base import cpu_features
    from vllm_qe.runtime.plugin import request_amx_permission

    return "amx" in cpu_features() and request_amx_permission()
