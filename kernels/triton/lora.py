"""Punica-style low-rank adapter kernels for the shared and routed experts.

Tokens are grouped by expert id (a shared expert is one expert that every token uses) into blocks of BLOCK_M rows
that all share one expert (the `moe_align_block_size` idea), so each program does dense `tl.dot`s:
`shrink`: t[m, :] = x[m, :] · A[e(m)]ᵀ  (`[M, K] x [E, R, K] -> [M, R]`),
`expand`: y[m, :] += t[m, :] · B[e(m)]ᵀ (`[M, R] x [E, N, R] -> [M, N]`, in place on float32 y).
One launch covers all experts; experts with no tokens cost nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def align_tokens(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort tokens by expert and pad each expert's run to a multiple of `block_m`.

    Returns `sorted_ids` `[num_blocks * block_m]` (token index, or M for padding) and `block_expert`
    `[num_blocks]`."""
    m = expert_ids.numel()
    ids = expert_ids.reshape(-1).long()
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    total = int(padded.sum())
    sorted_ids = torch.full((total,), m, dtype=torch.int32, device=ids.device)
    run_starts = torch.cumsum(counts, 0) - counts
    rank_in_run = torch.arange(m, device=ids.device) - run_starts[ids[order]]
    sorted_ids[starts[ids[order]] + rank_in_run] = order.to(torch.int32)
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=ids.device), padded // block_m)
    return sorted_ids, block_expert.to(torch.int32)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, t_ptr, sorted_ptr, bexp_ptr, M, K, R,
                   stride_xm, stride_ae, stride_ar, stride_tm,
                   DOT_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    pr = tl.program_id(1)
    tok = tl.load(sorted_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
    e = tl.load(bexp_ptr + b)
    rr = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = tok < M
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + tok[:, None] * stride_xm + rk[None, :], mask=valid[:, None] & (rk < K)[None, :],
                    other=0.0)
        a = tl.load(a_ptr + e * stride_ae + rr[None, :] * stride_ar + rk[:, None],
                    mask=(rr < R)[None, :] & (rk < K)[:, None], other=0.0)
        if DOT_IEEE:
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, a.to(x.dtype))
    tl.store(t_ptr + tok[:, None] * stride_tm + rr[None, :], acc, mask=valid[:, None] & (rr < R)[None, :])


@triton.jit
def _expand_kernel(t_ptr, b_ptr, y_ptr, sorted_ptr, bexp_ptr, M, N, R,
                   stride_tm, stride_be, stride_bn, stride_ym,
                   DOT_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0)
    pn = tl.program_id(1)
    tok = tl.load(sorted_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
    e = tl.load(bexp_ptr + b)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = tok < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        t = tl.load(t_ptr + tok[:, None] * stride_tm + rr[None, :], mask=valid[:, None] & (rr < R)[None, :],
                    other=0.0)
        bw = tl.load(b_ptr + e * stride_be + rn[None, :] * stride_bn + rr[:, None],
                     mask=(rn < N)[None, :] & (rr < R)[:, None], other=0.0)
        if DOT_IEEE:
            acc += tl.dot(t, bw.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(t, bw.to(tl.float32))
    mask = valid[:, None] & (rn < N)[None, :]
    ptrs = y_ptr + tok[:, None] * stride_ym + rn[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


def lowrank_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, expert_ids: torch.Tensor,
                 *, block_m: int = 16, exact: bool | None = None) -> torch.Tensor:
    """`y[m] += (x[m] · a[e(m)]ᵀ) · b[e(m)]ᵀ` in place. `y` float32 `[M, N]`, `x` `[M, K]`, `a` `[E, R, K]`,
    `b` `[E, N, R]` (views with unit stride on the last dim), `expert_ids` `[M]`."""
    M, K = x.shape
    E, R, _ = a.shape
    N = b.shape[1]
    if M == 0:
        return y
    sorted_ids, bexp = align_tokens(expert_ids, E, block_m)
    t = torch.empty(M, R, device=x.device, dtype=torch.float32)
    ieee = x.dtype == torch.float32 if exact is None else exact
    br = max(16, triton.next_power_of_2(R))
    _shrink_kernel[(bexp.numel(), triton.cdiv(R, br))](
        x, a, t, sorted_ids, bexp, M, K, R, x.stride(0), a.stride(0), a.stride(1), t.stride(0),
        DOT_IEEE=ieee, BLOCK_M=block_m, BLOCK_R=br, BLOCK_K=32)
    _expand_kernel[(bexp.numel(), triton.cdiv(N, 64))](
        t, b, y, sorted_ids, bexp, M, N, R, t.stride(0), b.stride(0), b.stride(1), y.stride(0),
        DOT_IEEE=ieee, BLOCK_M=block_m, BLOCK_N=64, BLOCK_R=br)
    return y
