"""Calibration algorithms (pure functions on tensors), registered by name.

The registry: one entry per algorithm file in `MODULES`; each file registers its classes with `@register`
(base.py has the contract, compose.py the smoothing-then-quantization steps they share).
"""

import importlib

from vllm_qe.calibration.algorithms.base import (
    REGISTRY,
    Algorithm,
    LinearTarget,
    StatsRequest,
    get_algorithm,
    register,
)

MODULES = ("rtn", "gptq", "baselines", "qe", "veq")
for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["MODULES", "REGISTRY", "Algorithm", "LinearTarget", "StatsRequest", "get_algorithm", "register"]
