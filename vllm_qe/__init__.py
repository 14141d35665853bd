"""vllm-qe: quantized VLM serving on vLLM with token-aware low-rank error experts."""

__version__ = "0.1.0"


def register() -> None:
    """Entry point of the `vllm.general_plugins` group (called in every vLLM process; idempotent)."""
    from vllm_qe.runtime.plugin import register as _register

    _register()
