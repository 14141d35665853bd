"""GPTQ: column-by-column OBS quantization with the inverse-Hessian error feedback (Frantar et al.)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from vllm_qe.calibration.algorithms.base import Algorithm, LinearTarget, StatsRequest, register
from vllm_qe.calibration.algorithms.refit import refit_scales
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.quantizer import CLIPS, DEFAULT_CLIP, DEFAULT_SYM_GRID, choose_qparams
from vllm_qe.format.spec import ModuleScheme, WeightScheme

ACT_ORDERS = ("none", "static", "group")


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, *, damp: float = 0.01, block_size: int = 128,
    exempt: torch.Tensor | None = None, actorder: str = "static", clip: str = DEFAULT_CLIP,
    sym_grid: str = DEFAULT_SYM_GRID, refit: bool = False,
) -> QuantizedLinear:
    """Quantize `weight` `[out, in]` minimising `tr((W - Ŵ) H (W - Ŵ)ᵀ)` for `H` `[in, in]` = E[x xᵀ].

    `actorder`: the order the columns are quantized in.
    - `none`: natural order; a group's parameters are chosen from the error-updated weights when the group
      starts (block size = group size, so that is exact).
    - `static`: columns in decreasing `diag(H)`; every group's parameters are chosen up front from the original
      weights in natural grouping, so the checkpoint needs no permutation at serving time (llm-compressor's
      default).
    - `group`: decreasing `diag(H)` with groups formed in that order — needs a column permutation at serving
      time, which format v1 does not carry: refused here with a clear error.
    `clip`: `minmax` or `mse` (per-group clipping searched on the `diag(H)`-weighted error,
    `quantizer.mse_clip_qparams`); `sym_grid`: `restricted` | `full` (symmetric grids, `quantizer`).
    `damp`: fraction of the mean Hessian diagonal added to the diagonal. `exempt` (bool `[in]`): columns forced to
    integer zero-point (dequantized 0) — QE's token-independent channels, whose error goes to the adapters.
    `refit`: afterwards, refit each row's group scales to GPTQ's integers on the undamped loss (`refit.refit_scales`;
    never raises the loss)."""
    if actorder not in ACT_ORDERS:
        raise ValueError(f"actorder must be one of {ACT_ORDERS}, got {actorder!r}")
    if actorder == "group":
        raise ValueError("actorder='group' needs a per-column group index at serving time, which checkpoint format "
                         "v1 does not carry; use 'static' (same column order, groups in natural order)")
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")
    w = weight.detach().double().clone()
    out_f, in_f = w.shape
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    gs = scheme.group_size if scheme.group_size != -1 else in_f
    n_groups = -(-in_f // gs)
    scale = torch.zeros(out_f, n_groups)
    zero = torch.zeros(out_f, n_groups)
    column_weight = h.diagonal().float()

    def group_qparams(chunk: torch.Tensor, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """`[out, G']` scale/zero of the groups covering `chunk` `[out, len(cols)]` (exempt columns zeroed)."""
        chunk = chunk.clone()
        if exempt is not None:
            chunk[:, exempt[cols]] = 0.0
        qp = choose_qparams(chunk.float(), scheme.bits, gs, scheme.symmetric, clip, sym_grid=sym_grid,
                            column_weight=column_weight[cols])
        return qp.scale, qp.zero

    perm = torch.arange(in_f)
    if actorder == "static":
        scale, zero = group_qparams(w, slice(0, in_f))
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        block_size = gs if scheme.group_size != -1 else block_size
    col_group = perm // gs  # group of the column quantized at each position
    exempt_p = None if exempt is None else exempt[perm]
    h += damp * float(h.diagonal().mean()) * torch.eye(in_f, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_perm = torch.zeros(out_f, in_f, dtype=torch.int32)
    maxq = 2**scheme.bits - 1
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(col_group[col])
            if actorder == "none" and col % gs == 0:
                # a group starts a block here, so w == w1 on these columns
                cols = slice(col, min(col + gs, in_f))
                s_g, z_g = group_qparams(w[:, cols], cols)
                scale[:, g], zero[:, g] = s_g[:, 0], z_g[:, 0]
            s, z = scale[:, g].double(), zero[:, g].double()
            wc = w1[:, i]
            if exempt_p is not None and bool(exempt_p[col]):
                q = z.clone()
            else:
                q = torch.clamp(torch.round(wc / s) + z, 0, maxq)
            q_perm[:, col] = q.to(torch.int32)
            deq = (q - z) * s
            e = (wc - deq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q_int = torch.empty_like(q_perm)
    q_int[:, perm] = q_perm
    q = QuantizedLinear(q_int, scale, zero, scheme.bits, scheme.group_size, scheme.symmetric)
    return refit_scales(q, weight, hessian) if refit else q


@dataclass
class GPTQConfig:
    """GPTQ's options (`--method-params` of `gptq`; also the options of GPTQ as another algorithm's base). Every
    field is a keyword of `gptq_quantize`."""

    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    # column order (gptq_quantize): static by default (measured, docs/algorithms.md); `group` is not in format v1
    actorder: Literal["none", "static"] = "static"
    # refit the group scales to the final integers on the layer loss (refit.py; measured, docs/algorithms.md)
    refit: bool = True


@register
class GPTQ(Algorithm):
    """GPTQ with H = E[x xᵀ] (token-weighted when token weights are given)."""

    name = "gptq"
    Config = GPTQConfig

    def stats_request(self, scheme: ModuleScheme) -> StatsRequest:
        return StatsRequest(gram=True)

    def quantize_group(self, targets: list[LinearTarget]) -> dict[str, QuantizedLinear]:
        return {t.name: gptq_quantize(t.weight, t.stats.hessian(), t.scheme.weight, clip=self.clip,
                                         **asdict(self.config))
                for t in targets}
