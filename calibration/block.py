"""The calibration of one block (the layer loop's step): find the targets (target providers), stream their
inputs' statistics during one replay of the block, complete them over ranks (reducer), group the targets that
read one input, hand each group to the algorithm, swap in the fake-quant modules and replay the block again so
the next block sees quantized outputs (`propagate="quantized"`, default) or pass the full-precision outputs on
(`"fp"`)."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_qe.calibration.activations import ActivationStore
from vllm_qe.calibration.algorithms.base import Algorithm, LinearTarget
from vllm_qe.calibration.driver import Replay
from vllm_qe.calibration.fakequant import FakeQuantLinear
from vllm_qe.calibration.reduce import Reducer
from vllm_qe.calibration.stats import InputStats
from vllm_qe.calibration.targets import DenseLinears, FusedExperts, SampleContext, SchemeOf, Swaps, Target
from vllm_qe.format.module import QuantizedLinear

PROPAGATE = ("quantized", "fp")


@dataclass
class BlockReport:
    """Per-layer relative output errors, per-block seconds / peak RSS, and the input groups found."""

    layers: dict[str, float | None] = field(default_factory=dict)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)  # linears found to read one input tensor


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BlockCalibrator:
    """Calibrates blocks with `algorithm`; `scheme_of(name)` gives each module's scheme (None = leave it).

    `token_weights` (TLQ): unit -> per-sample `[T]` weights; `unit_ratio` (MBQ): unit -> g_vision / g_text;
    `gamma` (VEQ): the model's text/vision gradient ratio. Results accumulate in `results`
    (`{full module name: QuantizedLinear}`) and `report`."""

    def __init__(self, algorithm: Algorithm, scheme_of: SchemeOf, *, reducer: Reducer | None = None,
                 propagate: str = "quantized", seed: int = 0,
                 token_weights: dict[str, list[torch.Tensor]] | None = None,
                 unit_ratio: dict[str, float] | None = None, gamma: float = 1.0, swaps: Swaps | None = None) -> None:
        if propagate not in PROPAGATE:
            raise ValueError(f"propagate must be 'quantized' or 'fp', got {propagate!r}")
        self.algorithm = algorithm
        self.scheme_of = scheme_of
        self.reducer = reducer or Reducer()
        self.propagate = propagate
        self.seed = seed
        self.token_weights = token_weights or {}
        self.unit_ratio = unit_ratio or {}
        self.gamma = gamma
        self.swaps = swaps or Swaps()
        self.linears = DenseLinears()
        self.experts = FusedExperts()
        self.results: dict[str, QuantizedLinear] = {}
        self.report = BlockReport()

    def __call__(self, unit_name: str, unit: torch.nn.Module, replay: Replay) -> ActivationStore:
        t0 = time.perf_counter()
        linears = self.linears.find(unit_name, unit, self.scheme_of)
        experts = self.experts.find(unit_name, unit, self.scheme_of) if self.algorithm.supports_moe else {}
        targets = {**linears, **experts}
        if not targets:
            return replay()
        ctx = SampleContext()
        ratio = self.unit_ratio.get(unit_name)
        lin = self.linears.collect(unit, linears, self.algorithm, ctx, self.seed, ratio)
        exp = self.experts.collect(unit, experts, self.algorithm, ctx, self.seed, ratio, self.gamma)
        try:
            fp_out = replay(ctx, self.token_weights.get(unit_name))
        finally:
            for h in lin.hooks + exp.hooks:
                h.remove()
        stats, groups = lin.finish(self.reducer)
        expert_stats, expert_groups = exp.finish(self.reducer)
        stats.update(expert_stats)
        groups += expert_groups
        self.report.groups.extend([[f"{unit_name}.{s}" for s in g] for g in groups])
        done = self.quantize_groups(unit_name, targets, stats, groups)
        for s, (q, err) in done.items():
            self.report.layers[f"{unit_name}.{s}"] = err
            self.results[f"{unit_name}.{s}"] = q
        self.install(unit_name, unit, {s: q for s, (q, _) in done.items()})
        if self.propagate == "quantized":
            fp_out.close()
            out = replay()
        else:
            out = fp_out
        self.report.blocks.append({"block": unit_name, "seconds": round(time.perf_counter() - t0, 3),
                                   "peak_rss_mib": round(_max_rss_mib(), 1), "linears": len(targets),
                                   "spilled_samples": out.spilled})
        return out

    def install(self, unit_name: str, unit: torch.nn.Module, quantized: dict[str, QuantizedLinear]) -> None:
        """Swap the quantized modules of `unit` (`{sub name: QuantizedLinear}`) for their fake-quant twins: linears
        one by one, MoE experts a whole block at a time."""
        self.linears.install(unit_name, unit, quantized, self.scheme_of, self.swaps)
        self.experts.install(unit_name, unit, quantized, self.scheme_of, self.swaps)

    def quantize_groups(self, unit_name: str, targets: dict[str, Target], stats: dict[str, InputStats],
                        groups: list[list[str]]) -> dict[str, tuple[QuantizedLinear, float | None]]:
        """Quantize every input group (the reducer says which are this rank's; every rank ends with all) and
        measure each layer's relative output error on its sampled tokens."""
        mine: dict[str, tuple[QuantizedLinear, float | None]] = {}
        for j, subs in enumerate(groups):
            if not self.reducer.owns(j):
                continue
            group = [LinearTarget(f"{unit_name}.{s}", targets[s].weight.detach().float(),
                                  None if targets[s].bias is None else targets[s].bias.detach(),
                                  stats[s], targets[s].scheme) for s in subs]
            results = self.algorithm.quantize_group(group)
            for s, tgt in zip(subs, group):
                q = results[tgt.name].as_stored()  # propagate what the checkpoint will hold (float16 adapters)
                act = tgt.scheme.activation.bits if tgt.scheme.activation else None
                x = stats[s].sample
                if x is None or len(x) == 0:  # an MoE expert no calibration token was routed to
                    mine[s] = (q, None)
                    continue
                y_ref = torch.nn.functional.linear(x, tgt.weight, tgt.bias)
                y_q = FakeQuantLinear(q, tgt.bias, act)(x)
                mine[s] = (q, float((y_q - y_ref).norm() / y_ref.norm().clamp(min=1e-12)))
        return self.reducer.gather(mine)
