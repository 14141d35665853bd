"""Gradient statistics from one backward pass of the full-precision model over the calibration set.

- per-token importance (TLQ [I]): `‖∂L/∂h_t‖` of each block's output (`"gradnorm"`, default), or the first-order
  loss change `|∂L/∂h_t · (ĥ_t − h_t)|` with `ĥ` the block output of an RTN-quantized model (`"first_order"`);
- the modality gradient ratio of each block (MBQ: mean |∂L/∂h| over vision tokens / over text tokens) and the
  model-wide text/vision gradient ratio γ (VEQ).
L is the next-token loss on the answer tokens (all text tokens when a sample has no answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_qe.calibration.model_structure import Chain


@dataclass
class GradientStats:
    token_weight: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # unit -> per sample [T], mean 1
    vision_text_ratio: dict[str, float] = field(default_factory=dict)  # unit -> g_vis / g_text (language blocks)
    gamma: float = 1.0  # VEQ: mean |g| over text tokens / over vision tokens (language model)
    # unit -> [Σ|g| vision, Σ|g| text, N vision, N text] (what ranks all-reduce before `finalize`)
    sums: dict[str, list[float]] = field(default_factory=dict)

    def finalize(self) -> None:
        """Ratios from the sums: per language block g_vis / g_text floored at their median (MBQ), and γ."""
        ratios = {}
        for name, (vs, ts, vn, tn) in self.sums.items():
            ratios[name] = (vs / max(vn, 1)) / max(ts / max(tn, 1), 1e-30)
        if not ratios:
            return
        med = sorted(ratios.values())[len(ratios) // 2]
        self.vision_text_ratio = {k: max(v, med) for k, v in ratios.items()}
        vs, ts, vn, tn = (sum(v[i] for v in self.sums.values()) for i in range(4))
        self.gamma = (ts / max(tn, 1)) / max(vs / max(vn, 1), 1e-30)


def check_token_mix(mix: float) -> None:
    """`token_importance_mix` must lie in [0, 1] (a weight between uniform and pure importance)."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"token_importance_mix must be in [0, 1], got {mix}")


def mix_token_weights(weights: dict[str, list[torch.Tensor]], mix: float) -> dict[str, list[torch.Tensor]]:
    """Per-token weights `(1 - mix) + mix·w` (each `w` `[T]`, mean 1 per sample, so the result is too) [I].

    `mix = 1` is the pure gradient weighting; it lets the few tokens with the largest gradients dominate the GPTQ
    Hessian, and on a model with activation outliers that left the rest of the tokens unconstrained: on the
    outlier fixture (docs/results.md, 8000 questions) GPTQ W4A16 g32 KL 0.0013 uniform, 0.0396 pure gradnorm,
    0.0007 with `mix = 0.5`, 0.0007 with 0.25 (W3A16: 0.0015, 0.0097, 0.0011, 0.0010)."""
    check_token_mix(mix)
    return {name: [(1.0 - mix) + mix * w for w in ws] for name, ws in weights.items()}


def _labels(sample: dict[str, torch.Tensor], image_token: int, answer_start: int | None) -> torch.Tensor:
    ids = sample["input_ids"]
    labels = ids.clone()
    labels[ids == image_token] = -100
    if answer_start is not None:
        labels[:, :answer_start] = -100
    return labels


def collect_gradients(model: torch.nn.Module, chains: list[Chain], samples: list[dict[str, torch.Tensor]],
                      masks: list[dict[str, torch.Tensor]], image_token: int, answer_starts: list[int | None],
                      mode: str = "gradnorm", perturbed: dict[str, list[torch.Tensor]] | None = None
                      ) -> GradientStats:
    """One forward+backward per sample; `masks[i][tower]` is the vision mask of the tower's tokens.

    `perturbed` (first_order mode): unit -> per-sample block outputs of the quantized model."""
    if mode not in ("gradnorm", "first_order"):
        raise ValueError(f"token importance mode must be 'gradnorm' or 'first_order', got {mode!r}")
    units = [(c.tower, name, mod) for c in chains for name, mod in c.units]
    out = GradientStats()
    vis_sum: dict[str, float] = {}
    txt_sum: dict[str, float] = {}
    vis_n: dict[str, int] = {}
    txt_n: dict[str, int] = {}
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for i, s in enumerate(samples):
            captured: dict[str, torch.Tensor] = {}
            hooks = []
            for _, name, mod in units:
                def hook(m, args, output, name=name, captured=captured):
                    h = output[0] if isinstance(output, (tuple, list)) else output
                    if h.requires_grad:
                        h.retain_grad()
                        captured[name] = h
                hooks.append(mod.register_forward_hook(hook))
            try:
                with torch.enable_grad():
                    # Gradients flow from the inputs only (token embeddings, pixels): no parameter gradients kept.
                    emb = model.get_input_embeddings()
                    emb.weight.requires_grad_(True)
                    inputs = dict(s)
                    if "pixel_values" in inputs:
                        inputs["pixel_values"] = inputs["pixel_values"].clone().requires_grad_(True)
                    loss = model(**inputs, labels=_labels(s, image_token, answer_starts[i])).loss
                    loss.backward()
                    emb.weight.requires_grad_(False)
                    emb.weight.grad = None
            finally:
                for h in hooks:
                    h.remove()
            for tower, name, _ in units:
                h = captured.get(name)
                if h is None or h.grad is None:
                    continue
                g = h.grad.detach().reshape(-1, h.shape[-1])
                if mode == "first_order" and perturbed is not None:
                    d = perturbed[name][i].reshape(-1, h.shape[-1]) - h.detach().reshape(-1, h.shape[-1])
                    w = (g * d).sum(-1).abs()
                else:
                    w = g.norm(dim=-1)
                out.token_weight.setdefault(name, []).append((w / w.mean().clamp(min=1e-20)).float())
                if tower == "language":
                    vm = masks[i]["language"].reshape(-1)
                    gn = g.abs().mean(-1)
                    vis_sum[name] = vis_sum.get(name, 0.0) + float(gn[vm].sum())
                    txt_sum[name] = txt_sum.get(name, 0.0) + float(gn[~vm].sum())
                    vis_n[name] = vis_n.get(name, 0) + int(vm.sum())
                    txt_n[name] = txt_n.get(name, 0) + int((~vm).sum())
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    out.sums = {name: [vis_sum[name], txt_sum[name], float(vis_n[name]), float(txt_n[name])] for name in vis_sum}
    out.finalize()
    return out
