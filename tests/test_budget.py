"""Adapter ranks from a bits-per-weight budget (pure arithmetic, no vLLM)."""

from __future__ import annotations

import pytest

from vllm_qe.calibration.algorithms.budget import (
    ADAPTER_BITS,
    SMOOTH_BITS,
    adapter_bpw,
    ranks_for_budget,
    smoothing_bpw,
)
from vllm_qe.format.spec import AdapterScheme


@pytest.mark.parametrize("shape", [(1536, 1536), (1536, 8960), (8960, 1536), (128, 352), (200, 96)])
@pytest.mark.parametrize("budget", [0.0, 0.125, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("num_routed", [0, 4, 8])
def test_ranks_never_exceed_the_budget_and_are_maximal(shape, budget, num_routed) -> None:
    in_f, out_f = shape
    s = ranks_for_budget(in_f, out_f, budget, num_routed=num_routed)
    assert adapter_bpw(in_f, out_f, s) <= budget + 1e-12
    # one more shared rank would not fit
    bigger = AdapterScheme(s.shared_rank + 1, s.num_routed, s.routed_rank)
    assert adapter_bpw(in_f, out_f, bigger) > budget


def test_known_ranks() -> None:
    assert ADAPTER_BITS == 16  # the format stores adapters as float16
    # 1536x1536 at 0.25 bpw: 0.25 * 1536^2 / 16 = 36864 values = rank 12 over in + out = 3072
    assert ranks_for_budget(1536, 1536, 0.25) == AdapterScheme(shared_rank=12)
    # at 0.25 bpw, half to 4 routed experts: 18432 / 4 = 4608 values each, minus the router row 1536 -> rank 1
    s = ranks_for_budget(1536, 1536, 0.25, num_routed=4)
    assert (s.num_routed, s.routed_rank) == (4, 1)
    assert s.shared_rank == (36864 - 4 * (3072 + 1536)) // 3072
    # a budget too small for routed experts gives all of it to the shared one
    assert ranks_for_budget(128, 128, 0.25, num_routed=8) == AdapterScheme(shared_rank=1)


def test_smoothing_vectors_cost_one_float32_vector_per_member() -> None:
    assert SMOOTH_BITS == 32
    assert smoothing_bpw(1536, [1536, 256, 256]) == pytest.approx(3 * 32 / 2048)  # q/k/v of Qwen2-VL-2B: 0.047
    assert smoothing_bpw(128, 64) == 0.5


def test_a_fused_group_is_budgeted_with_every_members_adapters() -> None:
    # q/k/v/o of 128 wide with 32-wide k/v: one rank costs 4*128 + (128+32+32+128) = 832 values
    outs = [128, 32, 32, 128]
    s = ranks_for_budget(128, outs, 0.5)
    assert s.shared_rank == int(0.5 * 128 * 320 // ADAPTER_BITS) // 832
    assert adapter_bpw(128, outs, s) <= 0.5 < adapter_bpw(128, outs, AdapterScheme(s.shared_rank + 1))


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget_bpw"):
        ranks_for_budget(64, 64, -0.1)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_plan_gives_every_fused_group_one_scheme_within_the_budget(tiny_dir, arch) -> None:
    """The plan of a budgeted QE run: members of a group (same parent, same input) share one adapter scheme,
    and every group's adapters plus its smoothing vectors (QE's `auto` base declares smoothing) fit the budget."""
    import torch

    from vllm_qe.calibration.api import CalibrationConfig, plan_calibration

    budget = 0.5
    plan = plan_calibration(tiny_dir(arch), CalibrationConfig(method="qe", method_params={
        "adapter_bpw": budget, "num_routed": 2}))
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(str(tiny_dir(arch))))
    groups: dict[tuple[str, int], list[str]] = {}
    for n in plan.in_chains:
        if plan.scheme_of(n) is not None and ".experts." not in n:
            groups.setdefault((n.rpartition(".")[0], model.get_submodule(n).weight.shape[1]), []).append(n)
    assert groups
    for (_, in_f), members in groups.items():
        schemes = {plan.scheme_of(n).adapters for n in members}
        assert len(schemes) == 1, members
        outs = [model.get_submodule(n).weight.shape[0] for n in members]
        assert plan.scheme_of(members[0]).smooth  # auto: the vectors are stored, so they are budgeted
        assert adapter_bpw(in_f, outs, schemes.pop()) + smoothing_bpw(in_f, outs) <= budget


def test_a_budgeted_qe_checkpoint_declares_what_each_module_stores_within_the_budget(quantized_dir) -> None:
    """QE W4A8 with the `auto` base under a budget (W4A8: on this model it picks both kinds of base; at W4A6, since
    GPTQ refits its scales, every group picks a smoothed one): a group stores a smoothing vector only where its base smooths, its
    ranks come from the budget left after that vector and are trimmed to what the guard kept, and the checkpoint's
    scheme of every module is what it stores (the writer's overrides). Total: W4 g32 asymmetric (4.75 bpw) +
    at most the budget."""
    from vllm_qe.format import spec
    from vllm_qe.format.checkpoint import inspect_checkpoint, load_tensors, read_qe_config

    budget = 1.0
    out = quantized_dir("qwen2_vl", "qe", abits=8, method_params={"adapter_bpw": budget, "num_routed": 2})
    cfg = read_qe_config(out)
    tensors = load_tensors(out)
    smoothed = []
    for m in cfg.quantized_modules:
        s = cfg.module_scheme(m)
        shapes = {suffix: tuple(tensors[f"{m}.{suffix}"].shape) for suffix in spec.ALL_SUFFIXES
                  if f"{m}.{suffix}" in tensors}
        assert spec.stored_scheme(s, shapes) == s, m
        smoothed.append(s.smooth)
    assert any(smoothed) and not all(smoothed), smoothed  # both kinds of base were chosen on this model
    assert any(cfg.module_scheme(m).adapters.shared_rank for m in cfg.quantized_modules)
    assert cfg.storage["bits_per_weight"] <= 4.75 + budget
    assert inspect_checkpoint(out).modules  # the checkpoint validates against its declared schemes
