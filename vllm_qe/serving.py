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


# Media fetch bounds of `vllm-qe serve` (vLLM's own environment variables; a value already in the environment wins).
# vLLM's defaults are 5 s (image) / 10 s (audio) / 30 s (video) per attempt with 3 attempts whose timeouts grow 4x
# (5 + 1 + 20 + 4 + 80 s): a host that accepts and never replies held an image request ~110 s. One attempt bounds a
# request with a dead media URL by the timeout itself.
FETCH_TIMEOUT_S = 5
FETCH_ENV = {"VLLM_IMAGE_FETCH_TIMEOUT": str(FETCH_TIMEOUT_S), "VLLM_AUDIO_FETCH_TIMEOUT": "10",
             "VLLM_VIDEO_FETCH_TIMEOUT": "10", "VLLM_MEDIA_FETCH_MAX_RETRIES": "1"}


def server_env(fetch_timeout: int | None = None) -> dict[str, str]:
    """Environment of the server process: the caller's, plus the media fetch bounds (`FETCH_ENV`, unless already
    set) and a small KV cache on CPU. `fetch_timeout` (s) sets the image, audio and video timeouts outright."""
    env = dict(os.environ)
    for key, value in FETCH_ENV.items():
        env.setdefault(key, value)
    if fetch_timeout is not None:
        if int(fetch_timeout) < 1:
            raise ValueError(f"fetch timeout must be a whole number of seconds >= 1, got {fetch_timeout!r}")
        for key in ("VLLM_IMAGE_FETCH_TIMEOUT", "VLLM_AUDIO_FETCH_TIMEOUT", "VLLM_VIDEO_FETCH_TIMEOUT"):
            env[key] = str(int(fetch_timeout))
    if on_cpu():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


# Short or differently spelt vLLM flags for the defaults below (FlexibleArgumentParser also takes `_` for `-` and
# `--flag=value` / `--flag.key value`).
_FLAG_ALIASES = {"q": "quantization"}


def _flag_name(token: str) -> str | None:
    """`--max_model_len=9` -> `max-model-len`, `-q` -> `quantization`; None for a value."""
    if not token.startswith("-") or token == "-" or token[1:2].isdigit():
        return None
    name = token.lstrip("-").split("=", 1)[0].split(".", 1)[0].replace("_", "-")
    return _FLAG_ALIASES.get(name, name)


def _merge_flags(defaults: list[str], extra: list[str]) -> list[str]:
    """`defaults` (`--flag value` pairs) without the flags `extra` gives, then `extra`: each flag once, the
    user's value winning (`--middleware`, which vLLM appends, is kept from both)."""
    given = {n for n in map(_flag_name, extra) if n} - {"middleware"}
    out, i = [], 0
    while i < len(defaults):
        name = _flag_name(defaults[i])
        takes_value = i + 1 < len(defaults) and _flag_name(defaults[i + 1]) is None
        step = 2 if takes_value else 1
        if name not in given:
            out += defaults[i:i + step]
        i += step
    return out + extra


def server_command(model_dir: str, host: str = "127.0.0.1", port: int = 8000, extra: list[str] | None = None,
                   served_name: str | None = None) -> list[str]:
    """`python -m vllm_qe.server ...`: vLLM's OpenAI server through the project's thin wrapper (client mistakes as
    4xx, see `vllm_qe.server`; a module run works with both vllm and vllm-cpu, whose missing `vllm` distribution
    metadata breaks the `vllm serve` console script). `extra` vLLM flags override the defaults: no flag twice."""
    cmd = [sys.executable, "-m", "vllm_qe.server", "--model", str(model_dir),
           "--quantization", "quant_experts", "--host", host, "--port", str(port), "--max-model-len", "1024",
           "--limit-mm-per-prompt", '{"image": 1}']
    if served_name:
        cmd += ["--served-model-name", served_name]
    if on_cpu():
        cmd += ["--dtype", CPU_DTYPE]
    return cmd[:3] + _merge_flags(cmd[3:], list(extra or []))
