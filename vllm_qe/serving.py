"""How to start vLLM on a vllm-qe checkpoint on this platform (shared by the CLI, the demo and the tests)."""

from __future__ import annotations

import os
import sys


def on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


# CPU serving dtype of quantized checkpoints: bf16 is where the packed kernels pay off (torch's and vLLM's CPU int4
# GEMMs are bf16 kernels; float32 stays available: `engine_kwargs(..., dtype="float32")`, `--dtype float32`).
CPU_DTYPE = "bfloat16"


def engine_kwargs(model_dir: str, **overrides) -> dict:
    """Keyword arguments for `vllm.LLM` on this platform: bf16 on CPU, vLLM's default compilation (no
    `enforce_eager`; the plugin's forward is graph-safe)."""
    kw = dict(model=str(model_dir), quantization="quant_experts", max_model_len=1024,
              limit_mm_per_prompt={"image": 1}, seed=0)
    if on_cpu():
        kw["dtype"] = CPU_DTYPE
    kw.update(overrides)
    return kw


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    if on_cpu():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def server_command(model_dir: str, host: str = "127.0.0.1", port: int = 8000, extra: list[str] | None = None,
                   served_name: str | None = None) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server ...` (works with both vllm and vllm-cpu; the `vllm serve`
    console script needs the `vllm` distribution's metadata, which vllm-cpu lacks)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--quantization", "quant_experts", "--host", host, "--port", str(port), "--max-model-len", "1024",
           "--limit-mm-per-prompt", '{"image": 1}']
    if served_name:
        cmd += ["--served-model-name", served_name]
    if on_cpu():
        cmd += ["--dtype", CPU_DTYPE]
    return cmd + list(extra or [])
