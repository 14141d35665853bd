"""The algorithm plug-in interface: statistics in, quantized weights (+ adapters, router) out.

An algorithm is a class registered by name. The driver asks it which statistics to collect per linear layer
(`stats_request`), then hands it each *input group* (linear layers of one block that read the same tensor, e.g.
q/k/v or gate/up, so smoothing factors can be shared) and writes what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vllm_qe.calibration.stats import InputStats
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.spec import ModuleScheme


@dataclass
class StatsRequest:
    """What the driver must stream per linear layer: Gram matrix and/or a reservoir of token rows."""

    gram: bool = False
    max_tokens: int = 0
    topk: int = 0  # QE: count each token's `topk` most important channels (|x| * mean_row |W|)
    affinity: bool = False  # VEQ-MA: weight MoE experts' tokens by router probability x modality factor


@dataclass
class LinearTarget:
    """One linear layer to quantize: `weight` float32 `[out, in]`, its input statistics and its scheme."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    stats: InputStats | None
    scheme: ModuleScheme


class Algorithm:
    """Base class: subclasses set `name` and implement `quantize_group`."""

    name: ClassVar[str] = ""

    def __init__(self, **params: Any) -> None:
        self.params = params

    smooths: ClassVar[bool] = False  # writes `smooth_scale` tensors

    def uses_smoothing(self, act_quantized: bool) -> bool:
        """Whether this algorithm's checkpoint carries `smooth_scale` (may depend on activation quantization)."""
        return self.smooths

    def stats_request(self, scheme: ModuleScheme) -> StatsRequest | None:
        """None: this algorithm needs no calibration data (the driver skips the statistics pass)."""
        return None

    def quantize_group(self, targets: list[LinearTarget]) -> dict[str, QuantizedLinear]:
        raise NotImplementedError


REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    REGISTRY[cls.name] = cls
    return cls


def get_algorithm(name: str, **params: Any) -> Algorithm:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {sorted(REGISTRY)}")
    return REGISTRY[name](**params)
