"""Grouped low-bit expert GEMM for MoE layers (vLLM `fused_moe` style) with per-expert low-rank adapters.

Rows are (token, slot) pairs of the top-k routing, grouped by expert into blocks of BLOCK_M rows that share one
expert (`align_tokens`), so every program dequantizes one expert's packed weight tile and runs dense `tl.dot`s:
`h = act(x·W13[e]ᵀ + adapters13[e])`, `o = h·W2[e]ᵀ + adapters2[e]`, `y[t] = Σ_slot w[t, slot]·o[t, slot]`.
Weights use the checkpoint's packed layout per expert: `packed` `[E, N, P]`, `scale`/`zero` `[E, N, G]`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_qe.kernels.triton.gemm import _dequant_tile
from vllm_qe.kernels.triton.lora import align_tokens, lowrank_add_


@triton.jit
def _moe_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, sorted_ptr, bexp_ptr,
    num_rows, N, K, group_size, row_div,
    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_sg, stride_ym,
    BITS: tl.constexpr, SYM: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[row, n] = Σ_k x[row // row_div, k] · Wdeq[e(row), n, k] for the rows of block `program_id(0)`."""
    b = tl.program_id(0)
    pn = tl.program_id(1)
    row = tl.load(sorted_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = row < num_rows
    e = tl.load(bexp_ptr + b).to(tl.int64)
    src = row // row_div
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + src[:, None] * stride_xm + rk[None, :], mask=valid[:, None] & (rk < K)[None, :],
                    other=0.0)
        w = _dequant_tile(w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_se, rk, rn, K, N,
                          stride_wn, stride_sn, stride_sg, group_size, BITS, SYM)
        if DOT_IEEE:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(y_ptr + row[:, None] * stride_ym + rn[None, :], acc, mask=valid[:, None] & (rn < N)[None, :])


def moe_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
             group_size: int, sorted_rows: torch.Tensor, block_expert: torch.Tensor, num_rows: int, row_div: int,
             block_m: int) -> torch.Tensor:
    """float32 `[num_rows, N]`; row r reads input row `r // row_div` and the weights of its block's expert."""
    E, N, _ = packed.shape
    K = x.shape[1]
    gs = K if group_size == -1 else group_size
    y = torch.zeros(num_rows, N, device=x.device, dtype=torch.float32)
    z = zero if zero is not None else scale
    bn, bk = 32, 32
    _moe_gemm_kernel[(block_expert.numel(), triton.cdiv(N, bn))](
        x, packed, scale, z, y, sorted_rows, block_expert, num_rows, N, K, gs, row_div,
        x.stride(0), packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1), scale.stride(2),
        y.stride(0), BITS=bits, SYM=zero is None, DOT_IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk)
    return y


def fused_moe_qe(
    x: torch.Tensor, w13: tuple, w2: tuple, bits: int, group_size: int | tuple[int, int], topk_ids: torch.Tensor,
    topk_weights: torch.Tensor, adapters13: tuple | None = None, adapters2: tuple | None = None,
    block_m: int = 16, smooth13: torch.Tensor | None = None, smooth2: torch.Tensor | None = None,
) -> torch.Tensor:
    """SwiGLU MoE: `x` `[T, H]`; `w13` = (packed `[E, 2I, P]`, scale, zero|None) with gate rows first; `w2` =
    (packed `[E, H, P']`, ...); `topk_ids`/`topk_weights` `[T, k]`; adapters = (A `[E, r, in]`, B `[E, out, r]`)
    per expert (QE's shared expert of each MoE expert) or None; `group_size` may differ per GEMM (w13, w2);
    `smooth13` `[E, H]` / `smooth2` `[E, I]`: per-expert smoothing, the GEMM (not the adapters) reads `x / s`
    (rows are then materialised per (token, slot)). Returns `[T, H]` in x.dtype."""
    gs13, gs2 = group_size if isinstance(group_size, tuple) else (group_size, group_size)
    T, k = topk_ids.shape
    E = w13[0].shape[0]
    rows = T * k
    row_expert = topk_ids.reshape(-1)
    sorted_rows, bexp = align_tokens(row_expert, E, block_m)
    if smooth13 is None:
        h = moe_gemm(x, *w13, bits, gs13, sorted_rows, bexp, rows, k, block_m)
    else:
        xs = (x.repeat_interleave(k, dim=0).float() / smooth13[row_expert].float()).to(x.dtype)
        h = moe_gemm(xs, *w13, bits, gs13, sorted_rows, bexp, rows, 1, block_m)
    if adapters13 is not None:
        lowrank_add_(h, x.repeat_interleave(k, dim=0), adapters13[0], adapters13[1], row_expert, block_m=block_m)
    inter = h.shape[1] // 2
    act = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)
    act_in = act if smooth2 is None else (act.float() / smooth2[row_expert].float()).to(x.dtype)
    o = moe_gemm(act_in, *w2, bits, gs2, sorted_rows, bexp, rows, 1, block_m)
    if adapters2 is not None:
        lowrank_add_(o, act, adapters2[0], adapters2[1], row_expert, block_m=block_m)
    return (o.view(T, k, -1) * topk_weights.unsqueeze(-1).float()).sum(1).to(x.dtype)
