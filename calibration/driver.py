"""The layer-wise calibration driver: moves activations, calls the algorithm, never touches file formats.

For each chain (vision blocks, connector, language blocks) it runs the *current* model once per sample to capture
the chain's inputs (so a chain sees the outputs of already-quantized chains: quantization-exposed across towers),
then for each unit (block) of the chain:
1. runs the block on the cached inputs with hooks on its linear layers that stream `InputStats` (with vision/text
   token masks),
2. groups linear layers that read the same input tensor (q/k/v, gate/up) and asks the algorithm to quantize each
   group,
3. swaps the linears for `FakeQuantLinear` and re-runs the block to produce the next block's inputs
   (`propagate="quantized"`, default) or passes the full-precision outputs on (`propagate="fp"`).
Only one block's activations are held at a time (plus the per-sample keyword tensors the blocks share).
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_qe.calibration.algorithms.base import Algorithm, LinearTarget
from vllm_qe.calibration.fakequant import FakeQuantLinear
from vllm_qe.calibration.model_structure import Chain
from vllm_qe.calibration.stats import InputStats
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.spec import ModuleScheme

REPORT_TOKENS = 256


class _StopForward(Exception):
    pass


@dataclass
class LayerResult:
    name: str
    quantized: QuantizedLinear
    rel_error: float  # ||Y - Ŷ|| / ||Y|| on the layer's sampled calibration tokens


@dataclass
class DriverReport:
    layers: dict[str, float] = field(default_factory=dict)
    blocks: list[dict[str, Any]] = field(default_factory=list)


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LayerwiseDriver:
    """Calibrate `chains` of `model` with `algorithm`; `scheme_of(name)` gives each linear's scheme (None = skip)."""

    def __init__(
        self,
        model: torch.nn.Module,
        algorithm: Algorithm,
        scheme_of: Callable[[str], ModuleScheme | None],
        *,
        propagate: str = "quantized",
        seed: int = 0,
        progress: bool = True,
        token_weights: dict[str, list[torch.Tensor]] | None = None,
        unit_ratio: dict[str, float] | None = None,
    ) -> None:
        if propagate not in ("quantized", "fp"):
            raise ValueError(f"propagate must be 'quantized' or 'fp', got {propagate!r}")
        self.model = model
        self.algorithm = algorithm
        self.scheme_of = scheme_of
        self.propagate = propagate
        self.seed = seed
        self.progress = progress
        self.token_weights = token_weights or {}
        self.unit_ratio = unit_ratio or {}
        self.results: dict[str, QuantizedLinear] = {}
        self.report = DriverReport()

    # -- capture ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _capture(self, chain: Chain, samples: list[dict[str, torch.Tensor]]) -> list[list[tuple[tuple, dict]]]:
        """Per unit, per sample: the (args, kwargs) the unit was called with in the current model."""
        calls: list[list[tuple[tuple, dict]]] = [[] for _ in chain.units]
        hooks = []
        for i, (_, unit) in enumerate(chain.units):
            def pre(mod, args, kwargs, i=i):
                calls[i].append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
            hooks.append(unit.register_forward_pre_hook(pre, with_kwargs=True))

        def stop(mod, args, out):
            raise _StopForward

        hooks.append(chain.units[-1][1].register_forward_hook(stop))
        try:
            for s in samples:
                with contextlib.suppress(_StopForward):
                    self.model(**s)
        finally:
            for h in hooks:
                h.remove()
        for i, (name, _) in enumerate(chain.units):
            if len(calls[i]) != len(samples):
                raise RuntimeError(f"{name}: called {len(calls[i])} times for {len(samples)} samples")
        return calls

    # -- one unit -----------------------------------------------------------------------------------------------
    def _linears(self, unit_name: str, unit: torch.nn.Module) -> dict[str, tuple[torch.nn.Linear, ModuleScheme]]:
        out = {}
        for sub, mod in unit.named_modules():
            if isinstance(mod, torch.nn.Linear):
                full = f"{unit_name}.{sub}"
                scheme = self.scheme_of(full)
                if scheme is not None:
                    out[sub] = (mod, scheme)
        return out

    @torch.no_grad()
    def _run_unit(self, unit, calls, hiddens, masks, stats=None, linears=None, ptrs=None,
                  weights=None) -> list[torch.Tensor]:
        hooks = []
        current: dict[str, Any] = {}
        if stats is not None:
            for sub, (mod, _) in linears.items():
                def hook(m, inp, sub=sub):
                    x = inp[0]
                    t = x.reshape(-1, x.shape[-1])
                    mask = current["mask"]
                    if mask.numel() != t.shape[0]:
                        mask = torch.full((t.shape[0],), bool(mask.all()))
                    w = current.get("weight")
                    stats[sub].update(t, mask, w if w is not None and w.numel() == t.shape[0] else None)
                    if ptrs is not None and sub not in ptrs:
                        ptrs[sub] = (x.data_ptr(), tuple(x.shape))
                hooks.append(mod.register_forward_pre_hook(hook))
        outs = []
        try:
            for i, ((args, kwargs), h, m) in enumerate(zip(calls, hiddens, masks)):
                current["mask"] = m
                current["weight"] = None if weights is None else weights[i]
                a, k = _with_hidden(args, kwargs, h)
                outs.append(_first(unit(*a, **k)).detach())
        finally:
            for hk in hooks:
                hk.remove()
        return outs

    def _calibrate_unit(self, unit_name, unit, calls, hiddens, masks) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        linears = self._linears(unit_name, unit)
        if not linears:
            return self._run_unit(unit, calls, hiddens, masks)
        stats: dict[str, InputStats] = {}
        for sub, (mod, scheme) in linears.items():
            req = self.algorithm.stats_request(scheme)
            topk = req.topk if req else 0
            stats[sub] = InputStats(mod.in_features, gram=bool(req and req.gram),
                                    max_tokens=max(REPORT_TOKENS, req.max_tokens if req else 0), seed=self.seed,
                                    topk=topk, channel_score=mod.weight.detach().float().abs().mean(0) if topk else None)
            stats[sub].modality_ratio = self.unit_ratio.get(unit_name)
        ptrs: dict[str, tuple] = {}
        fp_out = self._run_unit(unit, calls, hiddens, masks, stats, linears, ptrs,
                                self.token_weights.get(unit_name))
        groups: dict[tuple, list[str]] = {}
        for sub in linears:
            groups.setdefault(ptrs.get(sub, (sub,)), []).append(sub)
        for subs in groups.values():
            targets = [LinearTarget(f"{unit_name}.{s}", linears[s][0].weight.detach().float(),
                                    None if linears[s][0].bias is None else linears[s][0].bias.detach(),
                                    stats[s], linears[s][1]) for s in subs]
            results = self.algorithm.quantize_group(targets)
            for s, tgt in zip(subs, targets):
                q = results[tgt.name]
                mod, scheme = linears[s]
                act = scheme.activation.bits if scheme.activation else None
                fq = FakeQuantLinear(q, tgt.bias, act)
                x = stats[s].sample
                y_ref = torch.nn.functional.linear(x, tgt.weight, tgt.bias)
                err = float((fq(x) - y_ref).norm() / y_ref.norm().clamp(min=1e-12))
                self.report.layers[tgt.name] = err
                self.results[tgt.name] = q
                parent_name, _, child = s.rpartition(".")
                setattr(unit.get_submodule(parent_name) if parent_name else unit, child, fq)
        out = self._run_unit(unit, calls, hiddens, masks) if self.propagate == "quantized" else fp_out
        self.report.blocks.append({"block": unit_name, "seconds": round(time.perf_counter() - t0, 3),
                                   "peak_rss_mib": round(_max_rss_mib(), 1), "linears": len(linears)})
        return out

    # -- whole model --------------------------------------------------------------------------------------------
    def run(self, chains: list[Chain], samples: list[dict[str, torch.Tensor]],
            masks_of: Callable[[Chain, dict[str, torch.Tensor]], torch.Tensor]) -> dict[str, QuantizedLinear]:
        total = sum(len(c.units) for c in chains)
        bar = tqdm(total=total, desc="calibrating", unit="block", disable=not self.progress)
        for chain in chains:
            calls = self._capture(chain, samples)
            masks = [masks_of(chain, s) for s in samples]
            hiddens = [_hidden_of(a, k) for a, k in calls[0]]
            for i, (name, unit) in enumerate(chain.units):
                bar.set_postfix_str(name)
                hiddens = self._calibrate_unit(name, unit, calls[i], hiddens, masks)
                calls[i] = []  # free this block's cached inputs
                bar.update(1)
        bar.close()
        return self.results
