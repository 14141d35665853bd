"""Adapter ranks from a bits-per-weight budget (pure arithmetic, no vLLM)."""

from __future__ import annotations

import pytest

from vllm_qe.calibration.algorithms.budget import adapter_bpw, ranks_for_budget
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
    # 1536x1536 at 0.25 bpw: 0.25 * 1536^2 / 16 = 36864 values = rank 12 over in + out = 3072
    assert ranks_for_budget(1536, 1536, 0.25) == AdapterScheme(shared_rank=12)
    # half to 4 routed experts: 18432 / 4 = 4608 values each, minus the router row 1536 -> rank 1 (3072 each)
    s = ranks_for_budget(1536, 1536, 0.25, num_routed=4)
    assert (s.num_routed, s.routed_rank) == (4, 1)
    assert s.shared_rank == (36864 - 4 * (3072 + 1536)) // 3072
    # a budget too small for routed experts gives all of it to the shared one
    assert ranks_for_budget(128, 128, 0.25, num_routed=8) == AdapterScheme(shared_rank=1)


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget_bpw"):
        ranks_for_budget(64, 64, -0.1)
