"""VEQ (arXiv 2602.01037) for MoE VLMs, as pure functions on one MoE layer's statistics.

- modality factors [S]: γ = mean |∇| over text tokens / over vision tokens, β = T_text / T_vision;
- VEQ-ME [S, I]: expert importance S_i = γ·N_i^text + β·N_i^vision weights the experts' output errors in a
  smoothing-scale search shared by all experts (they read the same normalised input);
- VEQ-MA [S]: per expert, GPTQ on the affinity Hessian H̃ = X·diag(p_j·α_j)·Xᵀ, p_j the router probability of
  token j for that expert and α_j = γ for text tokens, 1 for vision tokens.
The driver streams each expert's routed tokens (weighted by p_j·α_j when an algorithm asks for `affinity`) and
hands `VEQ` the experts as linear targets whose statistics carry `ExpertInfo` (counts per modality, γ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vllm_qe.calibration.algorithms.base import Algorithm, LinearTarget, StatsRequest, register
from vllm_qe.calibration.algorithms.compose import Recipe, quantize_smoothed, smoothing_scales
from vllm_qe.calibration.algorithms.gptq import gptq_quantize
from vllm_qe.calibration.algorithms.smoothing import grid_scale, quantized_output
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.spec import ModuleScheme, WeightScheme


def modality_factors(grad_text: float, grad_vision: float, n_text: int, n_vision: int) -> tuple[float, float]:
    """(γ, β) from mean gradient magnitudes and token counts."""
    return grad_text / max(grad_vision, 1e-30), n_text / max(n_vision, 1)


def expert_importance(n_text: torch.Tensor, n_vision: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """`[E]` S_i = γ·N_i^text + β·N_i^vision."""
    return gamma * n_text.double() + beta * n_vision.double()


def affinity_hessian(x: torch.Tensor, prob: torch.Tensor, is_text: torch.Tensor, gamma: float) -> torch.Tensor:
    """`[in, in]` H̃ = X diag(c) Xᵀ / Σc with c_j = p_j·α_j (α = γ for text tokens, 1 for vision ones)."""
    c = prob.double() * torch.where(is_text, torch.full_like(prob, gamma, dtype=torch.float64),
                                    torch.ones_like(prob, dtype=torch.float64))
    xd = x.double()
    return (xd * c[:, None]).t() @ xd / c.sum().clamp(min=1e-30)


def veq_ma_quantize(weight: torch.Tensor, x: torch.Tensor, prob: torch.Tensor, is_text: torch.Tensor,
                    gamma: float, scheme: WeightScheme, **gptq_options) -> QuantizedLinear:
    """GPTQ (`gptq_options`: `gptq_quantize`'s keywords) of one expert's weight `[out, in]` on its routed tokens
    `x` `[T, in]` with the affinity Hessian."""
    return gptq_quantize(weight, affinity_hessian(x, prob, is_text, gamma), scheme, **gptq_options)


def veq_me_scales(xs: list[torch.Tensor], weights: list[torch.Tensor], importance: torch.Tensor,
                  scheme: ModuleScheme, grid: int = 20) -> torch.Tensor:
    """One smoothing vector `[in]` for all experts: the AWQ grid over α minimising Σ_i S_i·err_i, where err_i is
    expert i's output MSE on its own tokens. `xs[i]` `[T_i, in]` (may be empty), `weights[i]` `[out, in]`."""
    x_mean = torch.cat([x for x in xs if len(x)]).abs().mean(0)
    best, best_s = float("inf"), torch.ones(x_mean.shape[0])
    for i in range(grid):
        s = grid_scale(x_mean, i / grid)
        total = 0.0
        for e, (x, w) in enumerate(zip(xs, weights)):
            if len(x) == 0:
                continue
            d = quantized_output(x, w, scheme, s) - x @ w.t()
            total += float(importance[e]) * float(d.pow(2).mean())
        if total < best:
            best, best_s = total, s
    return best_s


MODES = ("ma", "me", "me+ma")


@dataclass
class VEQConfig:
    mode: Literal["ma", "me", "me+ma"] = "ma"


@register
class VEQ(Algorithm):
    """VEQ. `mode`: "ma" (affinity-weighted GPTQ Hessian, default: the paper's better variant), "me" (expert-
    importance-weighted AWQ scale search shared by all experts' gate/up, then RTN) or "me+ma" (both: the shared
    scales, then GPTQ on the affinity Hessian of the scaled weights; the paper reports the two only separately).
    Layers outside MoE blocks get the same base method without expert weighting (GPTQ and/or AWQ). γ comes from
    the gradient pass; β = T_text / T_vision of each MoE layer."""

    name = "veq"
    Config = VEQConfig
    needs_gradients = True

    @property
    def shared_expert_scale(self) -> bool:
        return "me" in self.config.mode

    @property
    def recipe(self) -> Recipe:
        """The base composition: AWQ-style smoothing for ME (expert-weighted on MoE experts), GPTQ for MA."""
        return Recipe("awq" if "me" in self.config.mode else "none", "gptq" if "ma" in self.config.mode else "rtn",
                      clip=self.clip)

    def uses_smoothing(self, act_quantized: bool) -> bool:
        return self.recipe.smooths

    def stats_request(self, scheme: ModuleScheme) -> StatsRequest:
        req = self.recipe.stats_request()
        req.affinity = "ma" in self.config.mode
        return req

    def _scales(self, targets: list[LinearTarget]) -> torch.Tensor:
        experts = [t.stats.expert for t in targets]
        if len(targets) > 1 and all(e is not None for e in experts):  # all experts' gate/up: VEQ-ME
            info = experts[0]
            _, beta = modality_factors(info.gamma, 1.0, info.layer_text, info.layer_vision)
            importance = expert_importance(torch.tensor([e.n_text for e in experts]),
                                           torch.tensor([e.n_vision for e in experts]), info.gamma, beta).float()
            xs = [t.stats.sample if t.stats.sample is not None else torch.zeros(0, t.weight.shape[1])
                  for t in targets]
            return veq_me_scales(xs, [t.weight for t in targets], importance, targets[0].scheme)
        st = targets[0].stats
        if st.sample is None or len(st.sample) == 0:
            return torch.ones(targets[0].weight.shape[1])
        return smoothing_scales(self.recipe, targets)

    def quantize_group(self, targets: list[LinearTarget]) -> dict[str, QuantizedLinear]:
        s = self._scales(targets) if self.recipe.smooths else None
        return {t.name: quantize_smoothed(self.recipe.quantizer, t, s, clip=self.clip) for t in targets}
