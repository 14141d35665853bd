"""Shared fixtures (tiny models and checkpoints are built once per test session) and the test tiers.

Tiers (README, "Tests"): `pytest -m "not vllm"` is the fast tier (algorithms, format, kernel references; under
3 minutes on 2 cores); `pytest -m "vllm or integration"` the rest. A test is `integration` when it is marked so
or uses the `tiny_dir` / `quantized_dir` fixtures without being a `vllm` test (it builds or calibrates a model).
`integration` tests are left out of any `-m` selection that does not name them (`vllm` tests never are), and
`slow` tests (minutes) of any that does not name `slow`; a run without `-m` has everything but `slow`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


MODEL_FIXTURES = {"tiny_dir", "quantized_dir"}


def pytest_collection_modifyitems(config, items):
    expr = config.getoption("markexpr") or ""
    for item in items:  # (a vLLM test is in the vllm tier whatever its fixtures)
        if MODEL_FIXTURES & set(item.fixturenames) and not item.get_closest_marker("integration") \
                and not item.get_closest_marker("vllm"):
            item.add_marker(pytest.mark.integration)
    left_out = [m for m in ("slow", "integration") if m not in expr and (m == "slow" or expr)]

    def leave_out(item) -> bool:
        return any(item.get_closest_marker(m) and not (m == "integration" and item.get_closest_marker("vllm"))
                   for m in left_out)

    keep, dropped = [], []
    for item in items:
        (dropped if leave_out(item) else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


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
