"""Baselines in the same driver: SmoothQuant, AWQ, MBQ, LQER (RTN and GPTQ live in their own modules)."""

from __future__ import annotations

import torch

from vllm_qe.calibration.algorithms.base import Algorithm, LinearTarget, StatsRequest, register
from vllm_qe.calibration.algorithms.gptq import gptq_quantize
from vllm_qe.calibration.algorithms.lowrank import pad_rank, scaled_svd
from vllm_qe.calibration.algorithms.rtn import rtn_quantize
from vllm_qe.calibration.algorithms.smoothing import scale_search, smoothquant_scales
from vllm_qe.format.quantizer import dequantize
from vllm_qe.format.spec import AdapterScheme, ModuleScheme

SEARCH_TOKENS = 1024


def _group_sample(targets: list[LinearTarget]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled input tokens of a group (all members read the same input): x `[T, in]`, vision `[T]`, weight `[T]`."""
    st = targets[0].stats
    return st.sample, st.sample_vision, st.sample_weight


@register
class SmoothQuant(Algorithm):
    """s_c = max|x_c|^α / max|W_c|^(1-α) shared by the group, then RTN of W·diag(s); `alpha` (0.5)."""

    name = "smoothquant"
    smooths = True

    def quantize_group(self, targets):
        alpha = float(self.params.get("alpha", 0.5))
        s = smoothquant_scales(targets[0].stats.abs_max, [t.weight for t in targets], alpha)
        return {t.name: rtn_quantize(t.weight, t.scheme.weight, smooth=s) for t in targets}


@register
class AWQ(Algorithm):
    """Activation-aware scale search (grid over α of s = x̄^α) on the group's output error, then RTN (or GPTQ with
    `base="gptq"`). Activation quantization is included in the searched error for W+A settings."""

    name = "awq"
    smooths = True
    loss = "mse"

    def stats_request(self, scheme: ModuleScheme) -> StatsRequest:
        return StatsRequest(gram=self.params.get("base") == "gptq", max_tokens=SEARCH_TOKENS)

    def token_weights(self, targets) -> torch.Tensor | None:
        x, vis, w = _group_sample(targets)
        return w

    def quantize_group(self, targets):
        x, _, _ = _group_sample(targets)
        s, _ = scale_search(x, [t.weight for t in targets], targets[0].scheme,
                            token_weight=self.token_weights(targets), grid=int(self.params.get("grid", 20)),
                            loss=self.loss)
        out = {}
        for t in targets:
            if self.params.get("base") == "gptq":
                h = t.stats.hessian() / torch.outer(s.double(), s.double())  # inputs are x / s
                q = gptq_quantize(t.weight * s, h, t.scheme.weight)
                q.smooth = s
            else:
                q = rtn_quantize(t.weight, t.scheme.weight, smooth=s)
            out[t.name] = q
        return out


@register
class MBQ(AWQ):
    """Modality-balanced AWQ: vision tokens weigh `r` = g_vision / g_text (gradient ratio, from the driver's
    token weights when available, else the `vision_weight` parameter), loss |ΔO| (MBQ's code)."""

    name = "mbq"
    loss = "l1"
    needs_gradients = True

    def token_weights(self, targets):
        x, vis, w = _group_sample(targets)
        r = float(self.params.get("vision_weight", 1.0))
        ratio = getattr(targets[0].stats, "modality_ratio", None)
        if ratio is not None:
            r = ratio
        return torch.where(vis, torch.full_like(w, r), torch.ones_like(w))


@register
class LQER(Algorithm):
    """RTN (or GPTQ, `base="gptq"`) + one low-rank error reconstruction of rank `rank` from the SVD of
    `E·diag(s)`, `s` = mean|x| normalised by sqrt(min·max) (LQER's activation scale)."""

    name = "lqer"

    def __init__(self, **params):
        super().__init__(**params)
        self.rank = int(params.get("rank", 64))
        self.adapter_scheme = AdapterScheme(shared_rank=self.rank)

    def stats_request(self, scheme):
        return StatsRequest(gram=self.params.get("base") == "gptq")

    def quantize_group(self, targets):
        out = {}
        for t in targets:
            q = (gptq_quantize(t.weight, t.stats.hessian(), t.scheme.weight) if self.params.get("base") == "gptq"
                 else rtn_quantize(t.weight, t.scheme.weight))
            s = t.stats.abs_mean.clamp(min=1e-4)
            s = s / (s.min() * s.max()).sqrt()
            err = t.weight.float() - dequantize(q.qweight, q.scale, q.zero, q.group_size)
            a, b = scaled_svd(err, s, self.rank)
            q.shared_a, q.shared_b = pad_rank(a, b, self.rank)
            out[t.name] = q
        return out


