"""QE's adapters never raise a layer's calibration loss (pure functions, no vLLM)."""

from __future__ import annotations

import pytest
import torch

from vllm_qe.calibration.algorithms.qe import (
    QEParams,
    calibration_loss,
    drop_harmful_experts,
    qe_fit,
    routed_loss,
)
from vllm_qe.calibration.stats import InputStats
from vllm_qe.format.quantizer import dequantize
from vllm_qe.format.spec import AdapterScheme, ModuleScheme, WeightScheme


def _layer(seed: int, n: int = 1500, in_f: int = 64, out_f: int = 48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g) * (torch.rand(in_f, generator=g) * 2).exp()
    kind = torch.randint(0, 3, (n,), generator=g)
    for i in range(3):  # channel groups that light up for token subsets (what routed experts are for)
        x[kind == i, 16 + 8 * i:24 + 8 * i] *= 6
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    st = InputStats(in_f, gram=True, max_tokens=n, topk=6, channel_score=w.abs().mean(0))
    st.update(x, torch.zeros(n, dtype=torch.bool))
    return w, x, st


def _base_error(q, w) -> torch.Tensor:
    return w - dequantize(q.qweight, q.scale, q.zero, q.group_size)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("exempt", [False, True])
@pytest.mark.parametrize("base", ["rtn", "gptq"])
def test_shared_and_routed_adapters_never_raise_the_calibration_loss(seed, exempt, base) -> None:
    w, x, st = _layer(seed)
    ranks = AdapterScheme(shared_rank=2, num_routed=3, routed_rank=2)
    scheme = ModuleScheme(WeightScheme(3, 32, False), None, ranks)
    p = QEParams(k=4, num_routed=3, exempt_shared=exempt, guard_adapters=True)
    q = qe_fit(w, st, scheme, p, None, base, ranks=ranks)
    err = _base_error(q, w)
    h = st.hessian()
    after_shared = err - q.shared_b @ q.shared_a
    assert calibration_loss(after_shared, h) <= calibration_loss(err, h)
    tw = torch.ones(x.shape[0])
    with_routed, _ = routed_loss(after_shared, x, tw, q.routed_a, q.routed_b, q.router)
    assert with_routed <= float((x @ after_shared.t()).pow(2).sum())


def test_a_harmful_routed_expert_is_dropped_and_its_router_row_reset() -> None:
    w, x, _ = _layer(3)
    resid = w * 0.1
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 2, 64, generator=g)
    b = torch.randn(2, 48, 2, generator=g)  # random experts: they add error wherever they are picked
    router = torch.rand(2, 64, generator=g)
    tw = torch.ones(x.shape[0])
    before, gain = routed_loss(resid, x, tw, a, b, router)
    assert bool((gain > 0).any())  # the case is harmful without the guard
    a2, b2, r2 = drop_harmful_experts(resid, x, tw, a, b, router)
    after, gain2 = routed_loss(resid, x, tw, a2, b2, r2)
    no_experts = float((x @ resid.t()).pow(2).sum())
    # equal when every expert is dropped; the two float32 sums differ in order with the thread count
    assert after <= no_experts * (1 + 1e-6) and no_experts < before
    assert bool((gain2 <= 0).all())


def test_a_group_stores_only_the_adapter_ranks_it_uses() -> None:
    """`trim_group_adapters`: zero-padded ranks (a short fit, a guard-dropped expert) are cut to the largest rank
    any member uses, routed experts whose factors are all zero are dropped with their router, and every member
    computes exactly what it computed before."""
    from vllm_qe.calibration.algorithms.qe import trim_group_adapters
    from vllm_qe.format.module import QuantizedLinear
    from vllm_qe.kernels.reference import qe_linear, route

    g = torch.Generator().manual_seed(0)
    in_f, outs, e, r = 32, (24, 8), 4, 6

    def member(out_f: int, shared_used: int, routed_used: int) -> QuantizedLinear:
        q = QuantizedLinear(torch.randint(0, 16, (out_f, in_f), generator=g), torch.rand(out_f, 1, generator=g),
                            torch.full((out_f, 1), 8.0), 4, -1, False)
        q.shared_a, q.shared_b = torch.zeros(r, in_f), torch.zeros(out_f, r)
        q.shared_a[:shared_used] = torch.randn(shared_used, in_f, generator=g)
        q.shared_b[:, :shared_used] = torch.randn(out_f, shared_used, generator=g)
        q.routed_a, q.routed_b = torch.zeros(e, r, in_f), torch.zeros(e, out_f, r)
        q.routed_a[1, :routed_used] = torch.randn(routed_used, in_f, generator=g)
        q.routed_b[1, :, :routed_used] = torch.randn(out_f, routed_used, generator=g)
        q.router = torch.rand(e, in_f, generator=g)
        return q

    x = torch.randn(50, in_f, generator=g)

    def outputs(group: dict[str, QuantizedLinear]) -> list[torch.Tensor]:
        return [qe_linear(x, q.dequantized_weight(), shared_a=q.shared_a, shared_b=q.shared_b, routed_a=q.routed_a,
                          routed_b=q.routed_b, expert_ids=None if q.router is None else route(x, q.router)[:, None])
                for q in group.values()]

    group = {"q": member(outs[0], 2, 0), "k": member(outs[1], 3, 0)}
    before = outputs(group)
    trimmed = trim_group_adapters(group)
    assert [q.shared_a.shape[0] for q in trimmed.values()] == [3, 3]
    assert [q.shared_b.shape[1] for q in trimmed.values()] == [3, 3]
    assert all(q.routed_a is None and q.routed_b is None and q.router is None for q in trimmed.values())
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, outputs(trimmed)))

    group = {"q": member(outs[0], 0, 4), "k": member(outs[1], 0, 1)}
    before = outputs(group)
    trimmed = trim_group_adapters(group)
    assert all(q.shared_a is None and q.shared_b is None for q in trimmed.values())
    assert [tuple(q.routed_a.shape) for q in trimmed.values()] == [(e, 4, in_f)] * 2
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, outputs(trimmed)))
