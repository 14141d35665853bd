"""Per-input-channel scaling shared by the layers that read one input (q/k/v, gate/up): SmoothQuant and the
AWQ/MBQ grid search. The runtime divides `x` by `s` and the stored integers quantize `W·diag(s)`."""

from __future__ import annotations

import torch

from vllm_qe.format.quantizer import compute_qparams, fake_quantize_activation, fake_quantize_weight
from vllm_qe.format.spec import ModuleScheme


def smoothquant_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """`s_c = max|x_c|^α / max|W_c|^(1-α)` over all weights of the group; `[in]`, clamped away from 0."""
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(min=1e-4)


def quantized_output(x: torch.Tensor, w: torch.Tensor, scheme: ModuleScheme, s: torch.Tensor | None) -> torch.Tensor:
    """`Q_act(x/s) · Q_w(W·diag(s))ᵀ` (RTN) for tokens `x` `[T, in]`: the layer output under scaling `s`."""
    ws = w if s is None else w * s
    wq = fake_quantize_weight(ws, compute_qparams(ws, scheme.weight.bits, scheme.weight.group_size,
                                                  scheme.weight.symmetric))
    xs = x if s is None else x / s
    if scheme.activation is not None:
        xs = fake_quantize_activation(xs, scheme.activation.bits)
    return xs @ wq.t()


def grid_scale(x_abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's candidate `s = x̄^α / sqrt(max·min)` `[in]` (clamped away from 0)."""
    s = x_abs_mean.clamp(min=1e-6).pow(alpha)
    return (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)


def scale_search(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    scheme: ModuleScheme,
    *,
    token_weight: torch.Tensor | None = None,
    grid: int = 20,
    loss: str = "mse",
) -> tuple[torch.Tensor, float]:
    """AWQ-style search `s = x̄^α / sqrt(max·min)`, `α ∈ {0, 1/grid, ...}`, minimising the group's output error on
    tokens `x` `[T, in]` (each token weighted by `token_weight`, MBQ/TLQ). Returns (`s` `[in]`, best loss).
    `loss`: "mse" (AWQ) or "l1" (MBQ's |ΔO|)."""
    tw = torch.ones(x.shape[0]) if token_weight is None else token_weight.float()
    tw = tw / tw.sum().clamp(min=1e-12)
    refs = [x @ w.t() for w in weights]
    x_mean = x.abs().mean(0)
    best, best_s = float("inf"), torch.ones(x.shape[1])
    for i in range(grid):
        s = grid_scale(x_mean, i / grid)
        total = 0.0
        for w, ref in zip(weights, refs):
            d = quantized_output(x, w, scheme, s) - ref
            per_tok = d.abs().mean(1) if loss == "l1" else d.pow(2).mean(1)
            total += float((per_tok * tw).sum())
        if total < best:
            best, best_s = total, s
    return best_s, best
