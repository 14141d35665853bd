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


def engine_kwargs(model_dir: str, **overrides) -> dict:
    """Keyword arguments for `vllm.LLM` that work on this platform (float32 + small KV cache on CPU)."""
    kw = dict(model=str(model_dir), quantization="quant_experts", max_model_len=1024, enforce_eager=True,
              limit_mm_per_prompt={"image": 1}, seed=0)
    if on_cpu():
        kw["dtype"] = "float32"
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
        cmd += ["--dtype", "float32", "--enforce-eager"]
    return cmd + list(extra or [])
