"""Shared fixtures: tiny models and checkpoints are built once per test session (seconds each)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vllm_qe_cache")
    os.environ["VLLM_QE_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """`tiny_dir(arch)` -> folder of a tiny random-init model (built once)."""
    from vllm_qe.testing.tiny_models import build_tiny_model

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny_{arch}") / arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def quantized_dir(tmp_path_factory, tiny_dir):
    """`quantized_dir(arch, method, **cfg)` -> a calibrated checkpoint (built once per argument set)."""
    from vllm_qe.calibration.api import CalibrationConfig, calibrate

    built: dict[tuple, Path] = {}

    def get(arch: str, method: str = "rtn", **cfg) -> Path:
        key = (arch, method, tuple(sorted((k, str(v)) for k, v in cfg.items())))
        if key not in built:
            cfg.setdefault("group_size", 32)
            cfg.setdefault("num_samples", 8)
            out = tmp_path_factory.mktemp(f"q_{arch}_{method}") / "ckpt"
            built[key] = calibrate(tiny_dir(arch), out, CalibrationConfig(method=method, **cfg), progress=False)
        return built[key]

    return get
