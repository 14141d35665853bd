"""Mixture-of-experts blocks for the layer-wise driver: where the experts are, each expert's projections as
linear weights `[out, in]`, the per-expert statistics (routed tokens, router probability, modality) and the
fake-quant experts that replace a calibrated block.

transformers keeps an MoE block's experts fused (`gate_up_proj` `[E, 2I, H]` with the gate rows first,
`down_proj` `[E, H, I]`) next to a router `gate` whose forward returns `(logits, top-k weights, top-k ids)`;
the checkpoint writes them per expert as `<experts>.<e>.{gate_proj,up_proj,down_proj}` (format doc, "MoE").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.spec import EXPERT_PROJS, parse_expert_name
from vllm_qe.kernels import reference


def is_fused_experts(mod: torch.nn.Module) -> bool:
    """A transformers fused-experts module (3-D `gate_up_proj` and `down_proj` parameters)."""
    gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.ndim == 3 and dn.ndim == 3


def find_moe_blocks(root: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """`{sub name: block}` of the MoE blocks under `root` (a module with fused `experts` and a router `gate`)."""
    return {n: m for n, m in root.named_modules()
            if is_fused_experts(getattr(m, "experts", None) or torch.nn.Module()) and hasattr(m, "gate")}


def expert_module_names(experts_path: str, num_experts: int) -> list[str]:
    return [f"{experts_path}.{e}.{p}" for e in range(num_experts) for p in EXPERT_PROJS]


def group_expert_modules(
    quantized: dict[str, QuantizedLinear],
) -> tuple[dict[str, QuantizedLinear], dict[str, list[dict[str, QuantizedLinear]]]]:
    """Split `{module name: QuantizedLinear}` into the other modules and, per experts path, the per-expert
    `{projection: QuantizedLinear}` in expert order; an expert or projection missing from the set is an error."""
    others: dict[str, QuantizedLinear] = {}
    blocks: dict[str, dict[int, dict[str, QuantizedLinear]]] = {}
    for name, q in quantized.items():
        parsed = parse_expert_name(name)
        if parsed is None:
            others[name] = q
        else:
            path, e, proj = parsed
            blocks.setdefault(path, {}).setdefault(e, {})[proj] = q
    out = {}
    for path, per_expert in blocks.items():
        n = max(per_expert) + 1
        if len(per_expert) != n or any(len(per_expert[e]) != len(EXPERT_PROJS) for e in per_expert):
            raise ValueError(f"{path}: quantized modules for only some of its experts / projections")
        out[path] = [per_expert[e] for e in range(n)]
    return others, out


def expert_weight(experts: torch.nn.Module, e: int, proj: str) -> torch.Tensor:
    """float32 `[out, in]` weight of expert `e`'s projection `proj` (a view-free copy)."""
    inter = experts.gate_up_proj.shape[1] // 2
    if proj == "gate_proj":
        w = experts.gate_up_proj[e, :inter]
    elif proj == "up_proj":
        w = experts.gate_up_proj[e, inter:]
    elif proj == "down_proj":
        w = experts.down_proj[e]
    else:
        raise ValueError(f"unknown expert projection {proj!r}")
    return w.detach().float().clone()


@dataclass
class ExpertInfo:
    """What VEQ needs about the expert a linear target belongs to: routed-token counts per modality, the MoE
    layer's token counts and the model's text/vision gradient ratio γ."""

    index: int
    n_text: int
    n_vision: int
    layer_text: int
    layer_vision: int
    gamma: float


def routed_tokens(top_k_index: torch.Tensor, e: int) -> torch.Tensor:
    """`[T_e]` indices of the tokens routed to expert `e` (`top_k_index` `[T, k]`)."""
    return (top_k_index == e).any(-1).nonzero(as_tuple=True)[0]


def expert_inputs(experts: torch.nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate/up input, down_proj input) of expert `e` for its tokens `x` `[T_e, H]`: `x` and `act(x·Wgᵀ)·(x·Wuᵀ)`."""
    xf = x.float()
    inter = experts.gate_up_proj.shape[1] // 2
    h = xf @ experts.gate_up_proj[e].detach().float().t()
    return xf, experts.act_fn(h[:, :inter]) * h[:, inter:]


def _stack_shared(parts: list[QuantizedLinear]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Shared adapters of modules stacked along the output (gate, up): A `[Σr, in]`, block-diagonal B `[Σout, Σr]`."""
    if all(q.shared_a is None for q in parts):
        return None
    a = torch.cat([q.shared_a for q in parts])
    b = torch.zeros(sum(q.shape[0] for q in parts), a.shape[0])
    o = r = 0
    for q in parts:
        b[o:o + q.shape[0], r:r + q.shared_a.shape[0]] = q.shared_b
        o, r = o + q.shape[0], r + q.shared_a.shape[0]
    return a, b


class FakeQuantExperts(torch.nn.Module):
    """Replaces a fused-experts module after calibration: per expert, the dequantized gate/up/down weights
    (smoothing folded out: experts are weight-only) and the shared low-rank experts; `forward` has the
    transformers experts' signature and is the MoE serving math (`reference.fused_moe`)."""

    def __init__(self, quantized: list[dict[str, QuantizedLinear]], act_fn: torch.nn.Module) -> None:
        super().__init__()
        if not isinstance(act_fn, torch.nn.SiLU) and type(act_fn).__name__ not in ("SiLUActivation", "SiLU"):
            raise ValueError(f"MoE experts with activation {type(act_fn).__name__}: only SwiGLU (SiLU) is supported")
        for i, qs in enumerate(quantized):
            if any(q.routed_a is not None for q in qs.values()):
                raise ValueError(f"expert {i}: routed adapters on MoE experts are not part of format v1")
        self.quantized = quantized
        self.register_buffer("w13", torch.stack([torch.cat([qs["gate_proj"].dequantized_weight(),
                                                            qs["up_proj"].dequantized_weight()]) for qs in quantized]),
                             persistent=False)
        self.register_buffer("w2", torch.stack([qs["down_proj"].dequantized_weight() for qs in quantized]),
                             persistent=False)
        a13 = [_stack_shared([qs["gate_proj"], qs["up_proj"]]) for qs in quantized]
        a2 = [_stack_shared([qs["down_proj"]]) for qs in quantized]
        self.adapters13 = None if a13[0] is None else tuple(torch.stack(t) for t in zip(*a13))
        self.adapters2 = None if a2[0] is None else tuple(torch.stack(t) for t in zip(*a2))
        self.num_experts = len(quantized)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return reference.fused_moe(hidden_states, self.w13, self.w2, top_k_index, top_k_weights, self.adapters13,
                                   self.adapters2)
