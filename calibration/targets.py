"""Target providers: the kinds of modules a block's calibration quantizes, each knowing how to find them, read
their weights, stream their inputs' statistics and swap in their fake-quant twin.

- `DenseLinears`: the block's `nn.Linear` layers; layers that read one input tensor (q/k/v, gate/up) form one
  input group (found by the tensor's storage during the statistics pass).
- `FusedExperts`: transformers' fused MoE experts (`gate_up_proj` `[E, 2I, H]`, `down_proj` `[E, H, I]`) as
  per-expert targets `<block>.experts.<e>.<proj>`: statistics from each expert's routed tokens (weighted by
  router probability x modality factor when the algorithm asks for `affinity`), groups per expert (or one group
  of all experts' gate/up for `shared_expert_scale`), `FakeQuantExperts` swapped in per block.
`SampleContext` is what the hooks know about the sample being replayed (vision mask, token weights); `Swaps`
records the modules a swap replaced so that an offloaded block can be put back (weights.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_qe.calibration.algorithms.base import Algorithm, StatsRequest
from vllm_qe.calibration.fakequant import FakeQuantLinear
from vllm_qe.calibration.moe import (
    ExpertInfo,
    FakeQuantExperts,
    expert_inputs,
    expert_module_names,
    expert_weight,
    find_moe_blocks,
    group_expert_modules,
    routed_tokens,
)
from vllm_qe.calibration.reduce import Reducer
from vllm_qe.calibration.stats import InputStats
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.spec import EXPERT_PROJS, ModuleScheme, parse_expert_name

REPORT_TOKENS = 256  # token reservoir of every target (the report's per-layer output error)

SchemeOf = Callable[[str], ModuleScheme | None]


@dataclass
class Target:
    """One module to quantize: `weight` `[out, in]` (a live parameter or a copy), `bias`, its scheme."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scheme: ModuleScheme


@dataclass
class SampleContext:
    """The sample being replayed: its vision mask (`[T]` of the language tokens, or one flag for a vision
    block) and token weights (`[T]`, TLQ) or None."""

    mask: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # per-forward values hooks hand each other

    def mask_weight(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Vision mask and token weights for a layer input of `n` tokens: a layer whose token count differs
        from the sample's (a vision block's patches) gets the sample's one modality and no weights."""
        mask = self.mask
        if mask.numel() != n:
            mask = torch.full((n,), bool(mask.all()))
        w = self.weight
        return mask, w if w is not None and w.numel() == n else None


def new_stats(request: StatsRequest | None, in_features: int, channel_score: torch.Tensor, seed: int,
              modality_ratio: float | None) -> InputStats:
    """Empty statistics of one input as an algorithm's `StatsRequest` asks (plus the report's sample)."""
    request = request or StatsRequest()
    st = InputStats(in_features, gram=request.gram, max_tokens=max(REPORT_TOKENS, request.max_tokens), seed=seed,
                    topk=request.topk, channel_score=channel_score if request.topk else None)
    st.modality_ratio = modality_ratio
    return st


class Swaps:
    """Module replacements below each block, recorded when `record` so that `restore` can undo them."""

    def __init__(self, record: bool = False) -> None:
        self.record = record
        self.saved: dict[str, list[tuple[torch.nn.Module, str, torch.nn.Module]]] = {}

    def swap(self, unit_name: str, unit: torch.nn.Module, sub: str, new: torch.nn.Module) -> None:
        parent_name, _, child = sub.rpartition(".")
        parent = unit.get_submodule(parent_name) if parent_name else unit
        if self.record:
            self.saved.setdefault(unit_name, []).append((parent, child, getattr(parent, child)))
        setattr(parent, child, new)

    def restore(self, unit_name: str) -> None:
        for parent, child, orig in reversed(self.saved.pop(unit_name, [])):
            setattr(parent, child, orig)


class Collection:
    """One provider's statistics pass over a block: `hooks` while the block is replayed, then `finish` gives
    `{target: InputStats}` and the input groups."""

    hooks: list

    def finish(self, reducer: Reducer) -> tuple[dict[str, InputStats], list[list[str]]]:
        raise NotImplementedError


class DenseLinears:
    """The `nn.Linear` layers of a block."""

    def find(self, unit_name: str, unit: torch.nn.Module, scheme_of: SchemeOf) -> dict[str, Target]:
        out = {}
        for sub, mod in unit.named_modules():
            if isinstance(mod, torch.nn.Linear):
                scheme = scheme_of(f"{unit_name}.{sub}")
                if scheme is not None:
                    out[sub] = Target(mod.weight, mod.bias, scheme)
        return out

    def collect(self, unit: torch.nn.Module, targets: dict[str, Target], algorithm: Algorithm,
                ctx: SampleContext, seed: int, modality_ratio: float | None) -> Collection:
        return _LinearCollection(unit, targets, algorithm, ctx, seed, modality_ratio)

    def install(self, unit_name: str, unit: torch.nn.Module, quantized: dict[str, QuantizedLinear],
                scheme_of: SchemeOf, swaps: Swaps) -> None:
        for sub, q in quantized.items():
            if parse_expert_name(sub) is not None:
                continue
            scheme = scheme_of(f"{unit_name}.{sub}")
            bias = unit.get_submodule(sub).bias
            act = scheme.activation.bits if scheme.activation else None
            swaps.swap(unit_name, unit, sub, FakeQuantLinear(q, None if bias is None else bias.detach(), act))


class _LinearCollection(Collection):
    def __init__(self, unit, targets, algorithm, ctx, seed, modality_ratio) -> None:
        self.subs = list(targets)
        self.stats = {sub: new_stats(algorithm.stats_request(t.scheme), t.weight.shape[1],
                                     t.weight.detach().float().abs().mean(0), seed, modality_ratio)
                      for sub, t in targets.items()}
        self.ptrs: dict[str, tuple] = {}
        keep: list[torch.Tensor] = []
        self.hooks = []
        for sub in self.subs:
            def hook(m, inp, sub=sub):
                x = inp[0]
                t = x.reshape(-1, x.shape[-1])
                self.stats[sub].update(t, *ctx.mask_weight(t.shape[0]))
                if sub not in self.ptrs:
                    # Keep the tensor alive so its memory cannot be reused by a later input of another layer
                    # (identity by address alone grouped o_proj with gate/up).
                    keep.append(x)
                    self.ptrs[sub] = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            self.hooks.append(unit.get_submodule(sub).register_forward_pre_hook(hook))

    def finish(self, reducer: Reducer) -> tuple[dict[str, InputStats], list[list[str]]]:
        for st in self.stats.values():
            reducer.stats(st)
        groups: dict[tuple, list[str]] = {}
        for sub in self.subs:
            groups.setdefault(self.ptrs.get(sub, (sub,)), []).append(sub)
        return self.stats, list(groups.values())


class FusedExperts:
    """The fused experts of a block's MoE layers, as per-expert targets `<block>.experts.<e>.<proj>`."""

    def find(self, unit_name: str, unit: torch.nn.Module, scheme_of: SchemeOf) -> dict[str, Target]:
        out = {}
        for bsub, block in find_moe_blocks(unit).items():
            experts = block.experts
            names = expert_module_names(f"{bsub}.experts", experts.gate_up_proj.shape[0])
            schemes = {n: scheme_of(f"{unit_name}.{n}") for n in names}
            picked = [n for n in names if schemes[n] is not None]
            if picked and len(picked) != len(names):
                raise ValueError(f"{unit_name}.{bsub}.experts: quantize all experts of an MoE block or none "
                                 f"(not quantized: {[n for n in names if schemes[n] is None][:3]}...)")
            for n in picked:
                _, e, proj = parse_expert_name(n)
                out[n] = Target(expert_weight(experts, e, proj), None, schemes[n])
        return out

    def collect(self, unit: torch.nn.Module, targets: dict[str, Target], algorithm: Algorithm,
                ctx: SampleContext, seed: int, modality_ratio: float | None, gamma: float = 1.0) -> Collection:
        return _ExpertCollection(unit, targets, algorithm, ctx, seed, modality_ratio, gamma)

    def install(self, unit_name: str, unit: torch.nn.Module, quantized: dict[str, QuantizedLinear],
                scheme_of: SchemeOf, swaps: Swaps) -> None:
        _, blocks = group_expert_modules(quantized)
        for path, per_expert in blocks.items():
            swaps.swap(unit_name, unit, path, FakeQuantExperts(per_expert, unit.get_submodule(path).act_fn))


class _ExpertCollection(Collection):
    """Per MoE block with quantized experts: one InputStats per expert for the gate/up input (shared by both
    projections; its counts are the expert's routed tokens per modality) and one for the down_proj input, and
    the layer's (text, vision) token counts."""

    def __init__(self, unit, targets, algorithm: Algorithm, ctx: SampleContext, seed, modality_ratio, gamma):
        self.algorithm = algorithm
        self.gamma = gamma  # VEQ: model-wide text/vision gradient ratio (α of text tokens in the affinity Hessian)
        self.blocks: dict[str, dict[str, Any]] = {}
        for bsub, block in find_moe_blocks(unit).items():
            if f"{bsub}.experts.0.gate_proj" not in targets:
                continue
            experts = block.experts
            n_exp = experts.gate_up_proj.shape[0]
            req = algorithm.stats_request(targets[f"{bsub}.experts.0.gate_proj"].scheme) or StatsRequest()
            gu = [new_stats(req, experts.gate_up_proj.shape[2],
                            experts.gate_up_proj[e].detach().float().abs().mean(0), seed, modality_ratio)
                  for e in range(n_exp)]
            dn = [new_stats(req, experts.down_proj.shape[2],
                            experts.down_proj[e].detach().float().abs().mean(0), seed, modality_ratio)
                  for e in range(n_exp)]
            self.blocks[bsub] = {"gate_up": gu, "down": dn, "affinity": req.affinity,
                                 "layer": torch.zeros(2, dtype=torch.long)}
        self.hooks = []
        for bsub, ms in self.blocks.items():
            block = unit.get_submodule(bsub)

            def gate_hook(mod, args, out, bsub=bsub):
                ctx.extra[f"probs:{bsub}"] = torch.softmax(out[0].float(), dim=-1)

            def experts_hook(mod, args, kwargs, ms=ms, bsub=bsub):
                hidden = args[0] if args else kwargs["hidden_states"]
                index = args[1] if len(args) > 1 else kwargs["top_k_index"]
                x = hidden.reshape(-1, hidden.shape[-1])
                vision, tw = ctx.mask_weight(x.shape[0])
                tw = torch.ones(x.shape[0]) if tw is None else tw.float()
                probs = ctx.extra[f"probs:{bsub}"]
                ms["layer"] += torch.tensor([int((~vision).sum()), int(vision.sum())])
                for e in range(len(ms["gate_up"])):
                    tok = routed_tokens(index.reshape(x.shape[0], -1), e)
                    if tok.numel() == 0:
                        continue
                    v = vision[tok]
                    w = tw[tok]
                    if ms["affinity"]:
                        w = w * probs[tok, e] * torch.where(v, 1.0, self.gamma)
                    xin, inter = expert_inputs(mod, e, x[tok])
                    ms["gate_up"][e].update(xin, v, w)
                    ms["down"][e].update(inter, v, w)

            self.hooks.append(block.gate.register_forward_hook(gate_hook))
            self.hooks.append(block.experts.register_forward_pre_hook(experts_hook, with_kwargs=True))

    def finish(self, reducer: Reducer) -> tuple[dict[str, InputStats], list[list[str]]]:
        """The experts' statistics under their target names and their input groups: per expert (gate, up) and
        (down); with `shared_expert_scale` (VEQ-ME) all experts' gate/up as one group (one smoothing vector
        searched over every expert's tokens)."""
        stats: dict[str, InputStats] = {}
        groups: list[list[str]] = []
        shared = self.algorithm.shared_expert_scale
        for bsub, ms in self.blocks.items():
            reducer.sum_(ms["layer"])  # the layer's token counts over all ranks (InputStats reduce their own)
            layer_text, layer_vision = (int(v) for v in ms["layer"])
            gate_up: list[str] = []
            for e, (gu, dn) in enumerate(zip(ms["gate_up"], ms["down"])):
                reducer.stats(gu)
                reducer.stats(dn)
                info = ExpertInfo(e, gu.n_tokens - gu.n_vision, gu.n_vision, layer_text, layer_vision, self.gamma)
                names = [f"{bsub}.experts.{e}.{p}" for p in EXPERT_PROJS]
                for n in names:
                    stats[n] = gu if not n.endswith("down_proj") else dn
                gu.expert = dn.expert = info
                gate_up.extend(names[:2])
                groups.append([names[2]])
                if not shared:
                    groups.append(names[:2])
            if shared:
                groups.append(gate_up)
        return stats, groups
