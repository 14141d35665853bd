"""GPTQ options against known answers: act-order, the full symmetric grid, MSE clipping (pure functions, no vLLM)."""

from __future__ import annotations

import pytest
import torch

from vllm_qe.calibration.algorithms.gptq import gptq_quantize
from vllm_qe.format.quantizer import compute_qparams, fake_quantize_weight, mse_clip_qparams, quantize
from vllm_qe.format.spec import WeightScheme


def _layer(out_f: int = 48, in_f: int = 256, n: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and inputs whose channel scales span e^0..e^3 (act-order matters when diag(H) is uneven)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g) * (torch.rand(in_f, generator=g) * 3).exp()
    return torch.randn(out_f, in_f, generator=g), x


def _output_error(w: torch.Tensor, x: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((((w_hat - w) @ x.T) ** 2).mean())


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [128, 32])
def test_static_actorder_beats_natural_order(symmetric: bool, group_size: int) -> None:
    wins = 0
    for seed in range(3):
        w, x = _layer(seed=seed)
        h = x.T @ x / len(x)
        scheme = WeightScheme(4, group_size, symmetric)
        natural = gptq_quantize(w, h, scheme, actorder="none").dequantized_weight()
        static = gptq_quantize(w, h, scheme, actorder="static").dequantized_weight()
        wins += _output_error(w, x, static) < _output_error(w, x, natural)
    assert wins == 3


def test_static_actorder_keeps_groups_in_natural_order() -> None:
    """Static order changes which integers are chosen, not where the groups are: every group's scale is the
    min-max scale of the original weights (no permutation needed at serving time)."""
    w, x = _layer()
    h = x.T @ x / len(x)
    q = gptq_quantize(w, h, WeightScheme(4, 64, False), actorder="static")
    ref = compute_qparams(w, 4, 64, False)
    assert torch.equal(q.scale, ref.scale) and torch.equal(q.zero, ref.zero)


def test_group_actorder_is_refused_with_the_reason() -> None:
    w, x = _layer(in_f=64)
    with pytest.raises(ValueError, match="format v1"):
        gptq_quantize(w, x.T @ x, WeightScheme(4, 32, False), actorder="group")


def test_full_symmetric_grid_uses_all_levels_and_lowers_error() -> None:
    w, _ = _layer(out_f=64, in_f=512)
    restricted = compute_qparams(w, 4, 128, True, sym_grid="restricted")
    full = compute_qparams(w, 4, 128, True, sym_grid="full")
    assert int(quantize(w, restricted).min()) == 1  # level 0 (= -8 after the zero point) never used
    assert int(quantize(w, full).min()) == 0
    assert int(quantize(w, full).max()) == 15
    err = {k: float((fake_quantize_weight(w, qp) - w).pow(2).sum()) for k, qp in
           (("restricted", restricted), ("full", full))}
    assert err["full"] < err["restricted"]


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_clipping_never_worse_than_minmax_per_group(symmetric: bool) -> None:
    w, _ = _layer(out_f=32, in_f=256)
    w[0, 5] = 40.0  # an outlier: clipping its group pays off
    minmax = compute_qparams(w, 3, 64, symmetric)
    mse = mse_clip_qparams(w, 3, 64, symmetric, norm=2.0)

    def group_err(qp) -> torch.Tensor:
        return (fake_quantize_weight(w, qp) - w).pow(2).reshape(32, 4, 64).sum(-1)

    assert bool((group_err(mse) <= group_err(minmax)).all())
    assert float(group_err(mse).sum()) < float(group_err(minmax).sum())


def test_mse_clip_lowers_gptq_output_error() -> None:
    w, x = _layer()
    h = x.T @ x / len(x)
    scheme = WeightScheme(3, 128, True)
    minmax = gptq_quantize(w, h, scheme, actorder="static").dequantized_weight()
    mse = gptq_quantize(w, h, scheme, actorder="static", clip="mse").dequantized_weight()
    assert _output_error(w, x, mse) < _output_error(w, x, minmax)
