"""The torch reference of every vllm-qe op: the CPU serving path and the oracle of the Triton kernels.

Math (docs/checkpoint-format.md, "Forward"): for tokens `x` `[T, in]`,
`y = Q_act(x / s) · Ŵ_sᵀ + (x·A_sᵀ)·B_sᵀ + (x·A_{e(t)}ᵀ)·B_{e(t)}ᵀ`, `e(t) = argmin_e (R·|x_t|)_e`.
All arithmetic is float32; results are cast back to `x.dtype`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_qe.format.quantizer import fake_quantize_activation


def route(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """Hard top-1 routing: `[T]` int64 expert ids, `argmin_e (router · |x_t|)_e` (ties -> lowest id).

    `x` `[T, in]`, `router` `[E, in]`."""
    return router_scores(x, router).argmin(dim=-1)


def router_scores(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """`[T, E]` predicted residual error of each routed expert (linear in |x|, so it all-reduces under TP)."""
    return x.float().abs() @ router.float().t()


def lowrank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Shared adapter `(x·aᵀ)·bᵀ`: `x` `[T, in]`, `a` `[r, in]`, `b` `[out, r]` -> `[T, out]` float32."""
    return (x.float() @ a.float().t()) @ b.float().t()


def routed_lowrank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Routed adapters, one per token: `a` `[E, r, in]`, `b` `[E, out, r]`, `expert` `[T]` -> `[T, out]`.

    Tokens are grouped by expert (the punica/bgmv pattern) so each expert is one pair of small GEMMs."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in torch.unique(expert).tolist():
        rows = (expert == e).nonzero(as_tuple=True)[0]
        out[rows] = (xf[rows] @ a[e].float().t()) @ b[e].float().t()
    return out


def qe_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    act_bits: int | None = None,
    smooth: torch.Tensor | None = None,
    out_splits: list[int] | None = None,
    shared_a: torch.Tensor | None = None,
    shared_b: torch.Tensor | None = None,
    routed_a: torch.Tensor | None = None,
    routed_b: torch.Tensor | None = None,
    expert_ids: torch.Tensor | None = None,
    act_absmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """One QE linear layer on `x` `[T, in]` with dequantized `weight` `[out, in]` (in smoothed space when `smooth`
    is given).

    A layer may fuse `n` checkpoint modules along its output (`out_splits`, summing to `out`; e.g. q/k/v). Module
    `g` owns output columns `out_splits[g]`, shared adapter rows `shared_a[g*r:(g+1)*r]` and routed experts
    `routed_a[g*E:(g+1)*E]`; `shared_b` `[out, r]` and `routed_b` `[E, out, r]` are indexed by output column.
    `expert_ids` `[T, n]` is each token's routed expert per module (see `route`). `act_absmax` `[T, 1]`: the
    per-token max |x / s| over the whole (tensor-parallel sharded) token, when this call holds only a slice.
    """
    splits = out_splits or [weight.shape[0]]
    y = base_gemm(x, weight, smooth, act_bits, act_absmax)
    o0 = 0
    for g, width in enumerate(splits):
        cols = slice(o0, o0 + width)
        if shared_a is not None:
            r = shared_a.shape[0] // len(splits)
            y[:, cols] += lowrank(x, shared_a[g * r:(g + 1) * r], shared_b[cols])
        if routed_a is not None:
            n_e = routed_a.shape[0] // len(splits)
            y[:, cols] += routed_lowrank(x, routed_a[g * n_e:(g + 1) * n_e], routed_b[:, cols], expert_ids[:, g])
        o0 += width
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def base_gemm(x: torch.Tensor, weight: torch.Tensor, smooth: torch.Tensor | None = None, act_bits: int | None = None,
              act_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """The base GEMM `Q_act(x / s) · Ŵᵀ` in float32: `x` `[T, in]`, dequantized `weight` `[out, in]` -> `[T, out]`."""
    xs = x.float() if smooth is None else x.float() / smooth.float()
    if act_bits:
        xs = fake_quantize_activation(xs, act_bits, act_absmax)
    return xs @ weight.float().t()


def route_grouped(scores: torch.Tensor, n_groups: int) -> torch.Tensor:
    """`scores` `[T, n*E]` (router scores of `n` fused modules) -> expert ids `[T, n]` (argmin within each module)."""
    return scores.reshape(scores.shape[0], n_groups, -1).argmin(dim=-1)


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
    adapters13: tuple[torch.Tensor, torch.Tensor] | None = None,
    adapters2: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SwiGLU MoE with dequantized expert weights: `w13` `[E, 2I, H]` (gate rows first), `w2` `[E, H, I]`,
    per-expert adapters (A `[E, r, in]`, B `[E, out, r]`); `y[t] = Σ_j w_tj · expert_{e_tj}(x_t)`."""
    return fused_moe_with(x, lambda e, xe: xe.float() @ w13[e].float().t(),
                          lambda e, a: a.float() @ w2[e].float().t(), w2.shape[1], topk_ids, topk_weights,
                          adapters13, adapters2)


ExpertGemm = Callable[[int, torch.Tensor], torch.Tensor]


def fused_moe_with(
    x: torch.Tensor, gemm13: ExpertGemm, gemm2: ExpertGemm, out_features: int, topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    adapters13: tuple[torch.Tensor, torch.Tensor] | None = None,
    adapters2: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`fused_moe` with the experts' base GEMMs given as functions `gemm(e, rows) -> [rows, out]` (any dtype; a
    packed kernel or a dequantized weight) and `out_features` = H. Adapters and the weighted sum run in float32; the SwiGLU activation is
    rounded to `x.dtype` before the down projection (as a real kernel stores it)."""
    y = torch.zeros(topk_ids.shape[0], out_features, dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in torch.unique(topk_ids).tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        h = gemm13(e, x[tok]).float()
        if adapters13 is not None:
            h = h + (xf[tok] @ adapters13[0][e].float().t()) @ adapters13[1][e].float().t()
        inter = h.shape[1] // 2
        a = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)
        o = gemm2(e, a).float()
        if adapters2 is not None:
            o = o + (a.float() @ adapters2[0][e].float().t()) @ adapters2[1][e].float().t()
        y.index_add_(0, tok, o * topk_weights[tok, slot].float()[:, None])
    return y.to(x.dtype)
