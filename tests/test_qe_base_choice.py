"""QE's `base="auto"`: the base (GPTQ, SmoothQuant + GPTQ, SmoothQuant + RTN) with
the lowest measured output error is chosen per input group (pure functions, no vLLM)."""

from __future__ import annotations

import pytest
import torch

from vllm_qe.calibration.algorithms.base import LinearTarget
from vllm_qe.calibration.algorithms.compose import (
    Recipe,
    base_output_error,
    choose_recipe,
    smooth_then_quantize,
)
from vllm_qe.calibration.algorithms.qe import QEParams, QuantExperts
from vllm_qe.calibration.stats import InputStats
from vllm_qe.format.spec import ActivationScheme, AdapterScheme, ModuleScheme, WeightScheme

CANDIDATES = [Recipe("none", "gptq"), Recipe("smoothquant", "gptq"), Recipe("smoothquant", "rtn")]


def _group(outlier_acts: bool, seed: int = 0, n: int = 1200, in_f: int = 128, out_f: int = 64, act_bits: int = 6):
    """Two linears reading one input. `outlier_acts`: four input channels 40x larger than the rest on every token
    (6-bit per-token activation quantization then rounds every other channel to a few levels: the case smoothing
    is for); else rare spikes (2 % of the tokens, 8-bit activations): SmoothQuant's `max|x|` still scales those
    channels' weight columns up and widens their groups for every token, which costs more than it saves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g)
    w = [torch.randn(out_f, in_f, generator=g) * 0.05 for _ in range(2)]
    if outlier_acts:
        x[:, :4] *= 40
    else:
        x[: n // 50, :4] *= 200
        act_bits = 8
    st = InputStats(in_f, gram=True, max_tokens=n)
    st.update(x, torch.zeros(n, dtype=torch.bool))
    scheme = ModuleScheme(WeightScheme(4, 32, False), ActivationScheme(act_bits), AdapterScheme(), smooth=True)
    return [LinearTarget(f"m{i}", wi, None, st, scheme) for i, wi in enumerate(w)]


@pytest.mark.parametrize("outlier_acts, smoothing", [(True, "smoothquant"), (False, "none")])
def test_choose_recipe_picks_the_base_with_the_lowest_output_error(outlier_acts: bool, smoothing: str) -> None:
    targets = _group(outlier_acts)
    bits = targets[0].scheme.activation.bits
    best, errors = choose_recipe(CANDIDATES, targets, act_bits=bits)
    assert best.smoothing == smoothing, errors
    assert errors[CANDIDATES.index(best)] == min(errors)
    # the error is what it says: recomputed from the quantized group
    again = base_output_error(smooth_then_quantize(best, targets), targets, bits)
    assert again == pytest.approx(min(errors), rel=1e-9)
    assert max(errors) > 1.2 * min(errors)  # the choice matters on both constructed groups


@pytest.mark.parametrize("outlier_acts", [True, False])
def test_qe_auto_base_is_never_worse_than_any_candidate(outlier_acts: bool) -> None:
    """QE (no adapters: `adapter_bpw=0`) with `base="auto"` gives the best candidate's base error, and stores a
    smoothing vector only where the chosen base smooths (a winning GPTQ base stores none)."""
    targets = _group(outlier_acts)
    bits = targets[0].scheme.activation.bits
    best, errors = choose_recipe(CANDIDATES, targets, act_bits=bits)
    qe = QuantExperts(QEParams(adapter_bpw=0, k=4, num_routed=0))
    out = qe.quantize_group(targets)
    assert all((q.smooth is not None) == best.smooths for q in out.values())
    assert all(q.stored_scheme(t.scheme).smooth == best.smooths for q, t in zip(out.values(), targets))
    assert base_output_error(out, targets, bits) <= min(errors) * (1 + 1e-6)


def test_weight_only_auto_base_smooths_columns_that_read_outlier_channels() -> None:
    """Weight-only: four input channels carry 64x activations and their weight columns are 64x smaller (the outlier
    fixture's structure, same outputs). Unsmoothed, those columns fall below every group's step and are lost;
    `auto` measures that and picks a smoothed base, and QE's base error is the best candidate's."""
    g = torch.Generator().manual_seed(1)
    n, in_f, out_f = 1200, 128, 64
    x = torch.randn(n, in_f, generator=g)
    w = [torch.randn(out_f, in_f, generator=g) * 0.05 for _ in range(2)]
    x[:, :4] *= 64
    for wi in w:
        wi[:, :4] /= 64
    st = InputStats(in_f, gram=True, max_tokens=n)
    st.update(x, torch.zeros(n, dtype=torch.bool))
    scheme = ModuleScheme(WeightScheme(4, 32, False), None, AdapterScheme(), smooth=True)
    targets = [LinearTarget(f"m{i}", wi, None, st, scheme) for i, wi in enumerate(w)]
    best, errors = choose_recipe(CANDIDATES, targets, act_bits=None)
    assert best.smoothing == "smoothquant" and errors[0] > 2 * min(errors), errors
    qe = QuantExperts(QEParams(adapter_bpw=0, k=4, num_routed=0))
    assert qe.uses_smoothing(False)  # the checkpoint declares smoothing: a group may choose it
    out = qe.quantize_group(targets)
    assert base_output_error(out, targets, None) <= min(errors) * (1 + 1e-6)


def test_qe_damp_reaches_its_gptq_base() -> None:
    """`QEParams.damp` is the damping of QE's GPTQ base: the recipe carries it, and it changes the stored weight
    (a damping of the Hessian's own scale turns GPTQ's error feedback almost off)."""
    targets = _group(outlier_acts=False)
    qe = QuantExperts(QEParams(base="gptq", adapter_bpw=0, damp=0.2))
    assert qe.recipe(targets).gptq.damp == 0.2
    damped = qe.quantize_group(targets)["m0"].qweight
    default = QuantExperts(QEParams(base="gptq", adapter_bpw=0)).quantize_group(targets)["m0"].qweight
    assert not torch.equal(damped, default)


@pytest.mark.parametrize("act_bits", [None, 8])
def test_qe_over_a_gptq_base_without_adapters_is_that_gptq(act_bits: int | None) -> None:
    """QE with a GPTQ base and no adapter budget stores exactly what GPTQ stores (the same float64 Hessian and
    options), so "QE over GPTQ" differs from GPTQ only by what QE adds. Inputs with a large common offset make
    `H = mu muᵀ + small covariance`, where a float32 copy of H (what QE used to hand its base) flips roundings."""
    from vllm_qe.calibration.algorithms.gptq import GPTQ, GPTQConfig

    g = torch.Generator().manual_seed(0)
    n, in_f = 512, 64
    x = 30.0 + 0.1 * torch.randn(n, in_f, generator=g)
    st = InputStats(in_f, gram=True, max_tokens=n)
    st.update(x, torch.zeros(n, dtype=torch.bool))
    act = None if act_bits is None else ActivationScheme(act_bits)
    scheme = ModuleScheme(WeightScheme(4, 32, False), act, AdapterScheme())
    targets = [LinearTarget(f"m{i}", torch.randn(32, in_f, generator=g) * 0.05, None, st, scheme) for i in range(2)]
    gptq = GPTQ(GPTQConfig()).quantize_group(targets)
    qe = QuantExperts(QEParams(base="gptq", adapter_bpw=0)).quantize_group(targets)
    for t in targets:
        assert torch.equal(qe[t.name].qweight, gptq[t.name].qweight), t.name
        assert torch.equal(qe[t.name].scale, gptq[t.name].scale), t.name
