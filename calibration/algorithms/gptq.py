"""GPTQ: column-by-column OBS quantization with the inverse-Hessian error feedback (Frantar et al.)."""

from __future__ import annotations

import torch

from vllm_qe.calibration.algorithms.base import Algorithm, LinearTarget, StatsRequest, register
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.quantizer import compute_qparams
from vllm_qe.format.spec import ModuleScheme, WeightScheme


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, *, damp: float = 0.01, block_size: int = 128,
    exempt: torch.Tensor | None = None,
) -> QuantizedLinear:
    """Quantize `weight` `[out, in]` minimising `tr((W - Ŵ) H (W - Ŵ)ᵀ)` for `H` `[in, in]` = E[x xᵀ].

    Group parameters are chosen from the (error-updated) weights when a group starts; with grouped weights the
    block size equals the group size so that is exact. `exempt` (bool `[in]`): columns forced to integer
    zero-point (dequantized 0) — QE's token-independent channels, whose error goes to the adapters."""
    w = weight.detach().double().clone()
    out_f, in_f = w.shape
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * float(h.diagonal().mean()) * torch.eye(in_f, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    gs = scheme.group_size if scheme.group_size != -1 else in_f
    if scheme.group_size != -1:
        block_size = gs
    n_groups = -(-in_f // gs)
    scale = torch.zeros(out_f, n_groups)
    zero = torch.zeros(out_f, n_groups)
    q_int = torch.zeros(out_f, in_f, dtype=torch.int32)
    maxq = 2**scheme.bits - 1
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col // gs
            if col % gs == 0:
                cols = slice(col, min(col + gs, in_f))
                chunk = w[:, cols].clone()  # a group starts a block here, so w == w1 on these columns
                if exempt is not None:
                    chunk[:, exempt[cols]] = 0.0
                qp = compute_qparams(chunk.float(), scheme.bits, -1, scheme.symmetric)
                scale[:, g], zero[:, g] = qp.scale[:, 0], qp.zero[:, 0]
            s, z = scale[:, g].double(), zero[:, g].double()
            wc = w1[:, i]
            if exempt is not None and bool(exempt[col]):
                q = z.clone()
            else:
                q = torch.clamp(torch.round(wc / s) + z, 0, maxq)
            q_int[:, col] = q.to(torch.int32)
            deq = (q - z) * s
            e = (wc - deq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return QuantizedLinear(q_int, scale, zero, scheme.bits, scheme.group_size, scheme.symmetric)


@register
class GPTQ(Algorithm):
    """GPTQ with H = E[x xᵀ] (token-weighted when token weights are given); `damp` = 0.01 of mean diag."""

    name = "gptq"

    def stats_request(self, scheme: ModuleScheme) -> StatsRequest:
        return StatsRequest(gram=True)

    def quantize_group(self, targets: list[LinearTarget]) -> dict[str, QuantizedLinear]:
        damp = float(self.params.get("damp", 0.01))
        return {t.name: gptq_quantize(t.weight, t.stats.hessian(), t.scheme.weight, damp=damp) for t in targets}
