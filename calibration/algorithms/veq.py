"""VEQ (arXiv 2602.01037) for MoE VLMs, as pure functions on one MoE layer's statistics.

- modality factors [S]: γ = mean |∇| over text tokens / over vision tokens, β = T_text / T_vision;
- VEQ-ME [S, I]: expert importance S_i = γ·N_i^text + β·N_i^vision weights the experts' output errors in a
  smoothing-scale search shared by all experts (they read the same normalised input);
- VEQ-MA [S]: per expert, GPTQ on the affinity Hessian H̃ = X·diag(p_j·α_j)·Xᵀ, p_j the router probability of
  token j for that expert and α_j = γ for text tokens, 1 for vision tokens.
The MoE path of the driver and the plugin's MoE method are not built yet; these functions are the algorithmic
core, unit-tested on synthetic layers.
"""

from __future__ import annotations

import torch

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
                    gamma: float, scheme: WeightScheme) -> QuantizedLinear:
    """GPTQ of one expert's weight `[out, in]` on its routed tokens `x` `[T, in]` with the affinity Hessian."""
    return gptq_quantize(weight, affinity_hessian(x, prob, is_text, gamma), scheme)


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
