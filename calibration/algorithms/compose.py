"""Smoothing, then quantization: the two steps every algorithm's base is made of, written once.

A `Recipe` names one smoothing (`none`, `smoothquant`, `awq`: one per-input-channel vector `s` shared by an
input group) and one quantizer (`rtn`, `gptq`). The quantizer sees `W·diag(s)` (and GPTQ the Hessian of the
inputs `x / s`); the runtime divides `x` by `s`. Algorithms compose it: SmoothQuant = (smoothquant, rtn),
AWQ = (awq, rtn | gptq), GPTQ = (none, gptq), LQER = (none, rtn | gptq) + a low-rank correction, VEQ = its own
expert-weighted smoothing + (rtn | gptq on the affinity Hessian), QE = any smoothing + its own exempt-channel
quantizer + shared / routed experts (`base=`: `BASES`). `choose_recipe` picks, per input group, the candidate base
with the lowest output error on the group's sampled tokens, activation quantization included (QE's `base="auto"`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from vllm_qe.calibration.algorithms.base import LinearTarget, StatsRequest
from vllm_qe.calibration.algorithms.gptq import GPTQConfig, gptq_quantize
from vllm_qe.calibration.algorithms.rtn import rtn_quantize
from vllm_qe.calibration.algorithms.smoothing import scale_search, smoothquant_scales
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.quantizer import DEFAULT_CLIP, dequantize
from vllm_qe.kernels.reference import base_gemm

SEARCH_TOKENS = 1024  # token reservoir of the AWQ-style scale search

Smoothing = Literal["none", "smoothquant", "awq"]
Quantizer = Literal["rtn", "gptq"]


@dataclass(frozen=True)
class Recipe:
    """Smoothing then quantization. `alpha`: SmoothQuant's migration strength; `grid` / `loss`: the AWQ search
    (`mse`, or MBQ's `l1`); `gptq`: GPTQ's options."""

    smoothing: Smoothing = "none"
    quantizer: Quantizer = "rtn"
    alpha: float = 0.5
    grid: int = 20
    loss: str = "mse"
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    clip: str = DEFAULT_CLIP  # the quantizer's group ranges (`quantizer.choose_qparams`)

    @property
    def smooths(self) -> bool:
        return self.smoothing != "none"

    def stats_request(self) -> StatsRequest:
        return StatsRequest(gram=self.quantizer == "gptq", max_tokens=SEARCH_TOKENS if self.smoothing == "awq" else 0)


def smoothing_scales(recipe: Recipe, targets: list[LinearTarget],
                     token_weight: torch.Tensor | None = None) -> torch.Tensor | None:
    """The group's smoothing vector `s` `[in]` (None for `none`). `awq` searches on the group's sampled tokens,
    each weighted by `token_weight` `[T]` (TLQ / MBQ) when given."""
    st = targets[0].stats
    weights = [t.weight for t in targets]
    if recipe.smoothing == "none":
        return None
    if recipe.smoothing == "smoothquant":
        return smoothquant_scales(st.abs_max, weights, recipe.alpha)
    if recipe.smoothing == "awq":
        s, _ = scale_search(st.sample, weights, targets[0].scheme, token_weight=token_weight, grid=recipe.grid,
                            loss=recipe.loss)
        return s
    raise ValueError(f"unknown smoothing {recipe.smoothing!r}")


def quantize_smoothed(quantizer: Quantizer, target: LinearTarget, smooth: torch.Tensor | None,
                      gptq: GPTQConfig | None = None, clip: str = DEFAULT_CLIP) -> QuantizedLinear:
    """`target`'s weight times `diag(smooth)` quantized by `quantizer` (group ranges by `clip`); GPTQ uses the
    Hessian of `x / smooth`."""
    scheme = target.scheme.weight
    if quantizer == "rtn":
        return rtn_quantize(target.weight, scheme, smooth=smooth, clip=clip)
    if quantizer == "gptq":
        h = target.stats.hessian()
        if smooth is not None:
            h = h / torch.outer(smooth.double(), smooth.double())  # the GPTQ inputs are x / s
        q = gptq_quantize(target.weight if smooth is None else target.weight * smooth, h, scheme,
                          clip=clip, **asdict(gptq or GPTQConfig()))
        q.smooth = smooth
        return q
    raise ValueError(f"unknown quantizer {quantizer!r}")


def smooth_then_quantize(recipe: Recipe, targets: list[LinearTarget],
                         token_weight: torch.Tensor | None = None) -> dict[str, QuantizedLinear]:
    """One smoothing vector for the group, then each member quantized on it."""
    s = smoothing_scales(recipe, targets, token_weight)
    return {t.name: quantize_smoothed(recipe.quantizer, t, s, recipe.gptq, recipe.clip) for t in targets}


# `base=` of the algorithms that build on another one: name -> (smoothing, quantizer). `veq` is GPTQ whose
# Hessian the layer loop weights by router affinity (the algorithm asks for `affinity` statistics).
BASES: dict[str, tuple[Smoothing, Quantizer]] = {
    "rtn": ("none", "rtn"),
    "gptq": ("none", "gptq"),
    "smoothquant": ("smoothquant", "rtn"),
    "awq": ("awq", "rtn"),
    "veq": ("none", "gptq"),
}


def base_output_error(quantized: dict[str, QuantizedLinear], targets: list[LinearTarget], act_bits: int | None,
                      token_weight: torch.Tensor | None = None) -> float:
    """Mean per-token relative output error of a quantized input group on its sampled tokens:
    `Σ_t w_t (Σ_m ‖Q_m(x_t) - W_m x_t‖² / Σ_m ‖W_m x_t‖²) / Σ_t w_t`, with the runtime's base GEMM (smoothing
    and `act_bits` activation quantization included). Per token, not pooled: the next block reads each token
    normalized (RMSNorm), and a pooled sum would let a few high-norm tokens choose for all the others.
    `targets[0].stats.sample` `[T, in]` are the tokens; `token_weight` `[T]` (default 1)."""
    x = targets[0].stats.sample
    if x is None or len(x) == 0:
        raise ValueError(f"{targets[0].name}: no sampled tokens to measure the base on")
    w = torch.ones(x.shape[0]) if token_weight is None else token_weight.float()
    num = torch.zeros(x.shape[0], dtype=torch.float64)
    den = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in targets:
        q = quantized[t.name]
        y = x.float() @ t.weight.float().t()
        y_q = base_gemm(x, dequantize(q.qweight, q.scale, q.zero, q.group_size), q.smooth, act_bits)
        num += (y_q - y).double().pow(2).sum(-1)
        den += y.double().pow(2).sum(-1)
    per_token = num / den.clamp(min=1e-30)
    return float((per_token * w.double()).sum() / w.double().sum().clamp(min=1e-30))


def choose_recipe(candidates: list[Recipe], targets: list[LinearTarget], act_bits: int | None,
                  token_weight: torch.Tensor | None = None) -> tuple[Recipe, list[float]]:
    """The candidate whose base (smoothing + quantizer, no adapters) has the lowest `base_output_error` on the
    group (ties: the earlier candidate), and every candidate's error. Whether smoothing pays depends on the model:
    it trades activation outliers for weight range, so it is measured per group instead of assumed."""
    errors = [base_output_error(smooth_then_quantize(r, targets, token_weight), targets, act_bits, token_weight)
              for r in candidates]
    best = min(range(len(candidates)), key=lambda i: (errors[i], i))
    return candidates[best], errors
