"""Baselines in the same pipeline: SmoothQuant, AWQ, MBQ, LQER (RTN and GPTQ live in their own modules), each a
composition of `compose.Recipe` (smoothing, then quantization) plus, for LQER, a low-rank correction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vllm_qe.calibration.algorithms.base import Algorithm, LinearTarget, StatsRequest, register
from vllm_qe.calibration.algorithms.compose import Recipe, quantize_smoothed, smooth_then_quantize
from vllm_qe.calibration.algorithms.lowrank import pad_rank, scaled_svd
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.quantizer import dequantize
from vllm_qe.format.spec import AdapterScheme, ModuleScheme


@dataclass
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength


@register
class SmoothQuant(Algorithm):
    """s_c = max|x_c|^α / max|W_c|^(1-α) shared by the group, then RTN of W·diag(s)."""

    name = "smoothquant"
    Config = SmoothQuantConfig

    def uses_smoothing(self, act_quantized: bool) -> bool:
        return True

    def quantize_group(self, targets: list[LinearTarget]) -> dict[str, QuantizedLinear]:
        return smooth_then_quantize(Recipe("smoothquant", "rtn", alpha=self.config.alpha, clip=self.clip), targets)


@dataclass
class AWQConfig:
    base: Literal["rtn", "gptq"] = "rtn"  # the quantizer after the scale search
    grid: int = 20  # α candidates 0, 1/grid, ...


@register
class AWQ(Algorithm):
    """Activation-aware scale search (grid over α of s = x̄^α) on the group's output error, then RTN (or GPTQ with
    `base="gptq"`). Activation quantization is included in the searched error for W+A settings."""

    name = "awq"
    Config = AWQConfig
    loss = "mse"

    @property
    def recipe(self) -> Recipe:
        return Recipe("awq", self.config.base, grid=self.config.grid, loss=self.loss, clip=self.clip)

    def uses_smoothing(self, act_quantized: bool) -> bool:
        return True

    def stats_request(self, scheme: ModuleScheme) -> StatsRequest:
        return self.recipe.stats_request()

    def token_weights(self, targets: list[LinearTarget]) -> torch.Tensor | None:
        """`[T]` weights of the group's sampled tokens in the search (TLQ's when given, else 1)."""
        return targets[0].stats.sample_weight

    def quantize_group(self, targets: list[LinearTarget]) -> dict[str, QuantizedLinear]:
        return smooth_then_quantize(self.recipe, targets, self.token_weights(targets))


@dataclass
class MBQConfig(AWQConfig):
    vision_weight: float = 1.0  # r when no gradient ratio is available


@register
class MBQ(AWQ):
    """Modality-balanced AWQ: vision tokens weigh `r` = g_vision / g_text (the block's gradient ratio from the
    gradient pass when available, else `vision_weight`), loss |ΔO| (MBQ's code)."""

    name = "mbq"
    Config = MBQConfig
    loss = "l1"
    needs_gradients = True

    def token_weights(self, targets: list[LinearTarget]) -> torch.Tensor:
        st = targets[0].stats
        w, vis = st.sample_weight, st.sample_vision
        r = self.config.vision_weight if st.modality_ratio is None else st.modality_ratio
        return torch.where(vis, torch.full_like(w, r), torch.ones_like(w))


@dataclass
class LQERConfig:
    rank: int = 64  # rank of the low-rank error reconstruction
    base: Literal["rtn", "gptq"] = "rtn"


@register
class LQER(Algorithm):
    """RTN (or GPTQ, `base="gptq"`) + one low-rank error reconstruction of rank `rank` from the SVD of
    `E·diag(s)`, `s` = mean|x| normalised by sqrt(min·max) (LQER's activation scale)."""

    name = "lqer"
    Config = LQERConfig

    @property
    def adapters(self) -> AdapterScheme:
        return AdapterScheme(shared_rank=self.config.rank)

    def stats_request(self, scheme: ModuleScheme) -> StatsRequest:
        return Recipe("none", self.config.base).stats_request()

    def quantize_group(self, targets: list[LinearTarget]) -> dict[str, QuantizedLinear]:
        out = {}
        for t in targets:
            q = quantize_smoothed(self.config.base, t, None, clip=self.clip)
            s = t.stats.abs_mean.clamp(min=1e-4)
            s = s / (s.min() * s.max()).sqrt()
            err = t.weight.float() - dequantize(q.qweight, q.scale, q.zero, q.group_size)
            a, b = scaled_svd(err, s, self.config.rank)
            q.shared_a, q.shared_b = pad_rank(a, b, self.config.rank)
            out[t.name] = q
        return out
