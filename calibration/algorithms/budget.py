"""Adapter ranks from a byte budget: bits per weight → shared / routed ranks of one layer (or fused group).

The adapters of a layer `[out, in]` store `r_s·(in + out)` (shared expert), `N_r·r_r·(in + out)` (routed experts)
and `N_r·in` (router) values of `adapter_bits` each (the format's dtype for them: float16, 16 bits). A budget of `b`
bits per weight allows `b·in·out / adapter_bits` stored values. Layers fused at serving time (q/k/v, gate/up)
must share one scheme, so their ranks are chosen for the group: each member keeps its own adapters, so one rank
costs `n·in + Σ out` values over the group's `in·Σ out` weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_qe.format.spec import (
    SHARED_A,
    SMOOTH_SCALE,
    AdapterScheme,
    ModuleScheme,
    WeightScheme,
    expected_tensors,
)

# bits of one stored adapter / router value: the format's dtype for them (float16)
ADAPTER_BITS = torch.finfo(expected_tensors(ModuleScheme(WeightScheme(), None, AdapterScheme(1)), 1, 1)[SHARED_A][0]).bits
# bits of one stored smoothing value (one vector `[in]` per module that declares smoothing)
SMOOTH_BITS = torch.finfo(expected_tensors(ModuleScheme(WeightScheme(), None, AdapterScheme(), True), 1, 1)[SMOOTH_SCALE][0]).bits


def _outs(out_f: int | Sequence[int]) -> list[int]:
    return [out_f] if isinstance(out_f, int) else list(out_f)


def adapter_values(in_f: int, out_f: int | Sequence[int], scheme: AdapterScheme) -> int:
    """Stored values of `scheme`'s adapters and router on a layer `[out_f, in_f]`, or on a group of layers with
    output sizes `out_f` (each member carries its own adapters and router)."""
    outs = _outs(out_f)
    width = len(outs) * in_f + sum(outs)  # one rank of every member: A rows [in] + B columns [out]
    routed = scheme.num_routed * (scheme.routed_rank * width + len(outs) * in_f) if scheme.num_routed else 0
    return scheme.shared_rank * width + routed


def adapter_bpw(in_f: int, out_f: int | Sequence[int], scheme: AdapterScheme,
                adapter_bits: int = ADAPTER_BITS) -> float:
    """Bits per weight the adapters add to a layer `[out_f, in_f]` (or a group, `out_f` a list)."""
    return adapter_values(in_f, out_f, scheme) * adapter_bits / (in_f * sum(_outs(out_f)))


def smoothing_bpw(in_f: int, out_f: int | Sequence[int], smooth_bits: int = SMOOTH_BITS) -> float:
    """Bits per weight of the smoothing vectors of a layer `[out_f, in_f]` (or a group: one vector per member)."""
    outs = _outs(out_f)
    return len(outs) * in_f * smooth_bits / (in_f * sum(outs))


def ranks_for_budget(in_f: int, out_f: int | Sequence[int], budget_bpw: float, *, num_routed: int = 0,
                     routed_share: float = 0.5, adapter_bits: int = ADAPTER_BITS) -> AdapterScheme:
    """The largest adapters that fit `budget_bpw` bits per weight on a layer `[out_f, in_f]` or a group of layers
    that share one scheme (`out_f` their output sizes).

    `num_routed = 0`: one shared expert of the largest rank that fits. Otherwise `routed_share` of the values
    go to the routed experts (each of rank `r_r`, plus the router), the rest to the shared expert; when the
    budget cannot pay for `num_routed` experts of rank ≥ 1 the routed part is dropped and the shared expert
    takes the whole budget. The result never exceeds the budget (`adapter_bpw(...) <= budget_bpw`)."""
    if budget_bpw < 0 or not 0.0 <= routed_share <= 1.0 or num_routed < 0:
        raise ValueError(f"need budget_bpw >= 0, 0 <= routed_share <= 1, num_routed >= 0; got {budget_bpw}, "
                         f"{routed_share}, {num_routed}")
    outs = _outs(out_f)
    values = int(budget_bpw * in_f * sum(outs) // adapter_bits)
    width = len(outs) * in_f + sum(outs)
    router = len(outs) * in_f
    if num_routed and routed_share > 0:
        routed_values = int(values * routed_share)
        r_r = (routed_values // num_routed - router) // width
        if r_r >= 1:
            r_s = (values - num_routed * (r_r * width + router)) // width
            return AdapterScheme(shared_rank=max(r_s, 0), num_routed=num_routed, routed_rank=r_r)
    return AdapterScheme(shared_rank=values // width)
