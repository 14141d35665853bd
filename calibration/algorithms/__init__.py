"""Calibration algorithms (pure functions on tensors), registered by name."""

from vllm_qe.calibration.algorithms import baselines, gptq, qe, rtn, veq  # noqa: F401  (registers)
from vllm_qe.calibration.algorithms.base import REGISTRY, Algorithm, LinearTarget, StatsRequest, get_algorithm

__all__ = ["REGISTRY", "Algorithm", "LinearTarget", "StatsRequest", "get_algorithm"]
