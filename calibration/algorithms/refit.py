"""Scale refit: given a quantizer's integers, the per-group scales that minimise the layer's calibration loss.

A quantizer (RTN, GPTQ) fixes the integers `q` and zero points `z` of a layer `[out, in]`; its scales were chosen
before the integers (min-max or a clipping search on the original weights, and GPTQ then moves later columns to
compensate). With `q` and `z` fixed, the dequantized row `r` is linear in that row's `G` group scales:
`Ŵ_r = Σ_g s_rg · v_rg` with `v_rg = (q_r − z_rg)` on group `g`'s columns, zero elsewhere. So the row's loss
`(W_r − Ŵ_r) H (W_r − Ŵ_r)ᵀ` (`H` = E[x xᵀ], the loss GPTQ minimises) is a quadratic in `s_r` with the exact
minimiser `M_r s_r = b_r`, `M_r[g, h] = v_rg H v_rhᵀ`, `b_r[g] = v_rg H W_rᵀ` — a `G x G` solve per row.
The new scales are rounded to float16 (the format's scale dtype) and kept per row only where that lowers the
row's loss and every scale is positive, so the layer's calibration loss never increases (tests/test_refit.py).
Cost: one pass of `out·in²` multiply-adds (the order of one GPTQ pass) plus `out` solves of size `G`; the loss
check reuses `M` and `b` (`sᵀMs − 2sᵀb`), so it needs no second pass over `H`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.quantizer import MIN_SCALE, _grouped, dequantize, num_groups


def refit_scales(q: QuantizedLinear, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedLinear:
    """`q` with its scales refit to minimise `tr((W − Ŵ) H (W − Ŵ)ᵀ)` for its own integers and zero points.

    `weight` `[out, in]`: the weight `q` quantizes (in the space of `q`'s integers: smoothed when `q` smooths);
    `hessian` `[in, in]`: that input's `E[x xᵀ]` (undamped: the loss itself). Rows whose refit (float16-rounded)
    scales do not lower the row's loss, or are not finite in float16, keep their scales (a negative solution is
    clamped to the smallest scale and judged like any other)."""
    out_f, in_f = q.shape
    if weight.shape != (out_f, in_f) or hessian.shape != (in_f, in_f):
        raise ValueError(f"refit_scales: weight {tuple(weight.shape)} / hessian {tuple(hessian.shape)} do not "
                         f"match the quantized layer [{out_f}, {in_f}]")
    gs = in_f if q.group_size == -1 else q.group_size
    n_g = num_groups(in_f, q.group_size)
    h = hessian.double()
    w = weight.double()
    # [out, in]: the dequantized weight per unit scale, `q - z` (exact integers)
    v = dequantize(q.qweight, torch.ones_like(q.scale), q.zero, q.group_size).double()
    vg = _grouped(v, q.group_size)  # [out, G, gs] (zero-padded)
    m = torch.empty(out_f, n_g, n_g, dtype=torch.float64)
    b = torch.empty(out_f, n_g, dtype=torch.float64)
    for g in range(n_g):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        c = v[:, cols] @ h[cols, :]  # [out, in]: v_rg H
        m[:, g, :] = _grouped(c * v, q.group_size).sum(dim=-1)
        b[:, g] = (c * w).sum(dim=1)
    # a group whose integers all sit on the zero point has no say in the loss: keep its scale
    empty = (vg == 0).all(dim=-1)  # [out, G]
    old = q.scale.double()
    eye = torch.eye(n_g, dtype=torch.float64).expand(out_f, n_g, n_g)
    m_solve = torch.where(empty[:, :, None] | empty[:, None, :], eye * empty[:, :, None], m)
    b_solve = torch.where(empty, old, b)
    ridge = 1e-12 * m_solve.diagonal(dim1=1, dim2=2).abs().amax(dim=1).clamp(min=1e-300)
    new, info = torch.linalg.solve_ex(m_solve + ridge[:, None, None] * torch.eye(n_g, dtype=torch.float64),
                                      b_solve[..., None])
    new = new[..., 0].float().clamp(min=MIN_SCALE).half().float()
    ok = (info == 0) & torch.isfinite(new).all(dim=1)
    new = torch.where(ok[:, None], new, q.scale.float())

    def loss_less_w_h_w(s: torch.Tensor) -> torch.Tensor:
        """`[out]`: the row loss minus its constant `W_r H W_rᵀ`, i.e. `sᵀ M s − 2 sᵀ b` (no extra pass over H)."""
        s = s.double()
        return torch.einsum("rg,rgh,rh->r", s, m, s) - 2 * (s * b).sum(dim=1)

    # keep a row's new scales only where the loss drops by more than float64 round-off of these terms
    margin = 1e-12 * torch.einsum("rg,rgh,rh->r", old, m, old).abs()
    better = loss_less_w_h_w(new) < loss_less_w_h_w(old) - margin
    return replace(q, scale=torch.where(better[:, None], new, q.scale.float()))
