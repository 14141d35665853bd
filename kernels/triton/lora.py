"""Punica-style low-rank adapter kernels for the shared and routed experts.

Tokens are grouped by expert id (a shared expert is one expert that every token uses) into blocks of BLOCK_M rows
that all share one expert (the `moe_align_block_size` idea), so each program does dense `tl.dot`s:
`shrink`: t[m, :] = x[m, :] · A[e(m)]ᵀ  (`[M, K] x [E, R, K] -> [M, R]`),
`expand`: y[m, :] += t[m, :] · B[e(m)]ᵀ (`[M, R] x [E, N, R] -> [M, N]`, in place on float32 y).
One launch covers all experts. The alignment runs on the device with sizes fixed by the shapes alone (an upper
bound on the padded rows, like vLLM's `moe_align_block_size`), so a layer's forward never synchronises with the
host and can be captured in a CUDA graph; programs past the actual padded count return at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_qe.kernels.triton import launcher


def max_padded_rows(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound of Σ_e ceil(count_e / block_m)·block_m over any routing of `num_rows` rows: at most
    min(E, rows) experts are non-empty, each padded by < block_m (rounded up to whole blocks)."""
    bound = num_rows + min(num_experts, num_rows) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


def align_tokens(expert_ids: torch.Tensor, num_experts: int, block_m: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort rows by expert and pad each expert's run to a multiple of `block_m`, on the device, fixed sizes.

    `expert_ids` `[R]` (ids in [0, E)). Returns `sorted_ids` int32 `[max_padded_rows]` (row index, or R for
    padding), `block_expert` int32 `[max_padded_rows / block_m]` (expert of each block; blocks past the used ones
    hold E - 1 and must be skipped) and `num_padded` int32 `[1]` (rows actually used, a multiple of block_m).
    No host synchronisation: every shape depends on (R, E, block_m) only."""
    ids = expert_ids.reshape(-1).long()
    m = ids.numel()
    dev = ids.device
    cap = max_padded_rows(m, num_experts, block_m)
    if num_experts == 1:  # shared adapter: one expert, rows in order
        sorted_ids = torch.full((cap,), m, dtype=torch.int32, device=dev)
        sorted_ids[:m] = torch.arange(m, dtype=torch.int32, device=dev)
        num = torch.full((1,), triton.cdiv(m, block_m) * block_m, dtype=torch.int32, device=dev)
        return sorted_ids, torch.zeros(cap // block_m, dtype=torch.int32, device=dev), num
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, ids, torch.ones_like(ids))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(ids, stable=True)
    sorted_expert = ids[order]
    run_starts = torch.cumsum(counts, 0) - counts
    dest = (ends - padded)[sorted_expert] + torch.arange(m, device=dev) - run_starts[sorted_expert]
    sorted_ids = torch.full((cap,), m, dtype=torch.int32, device=dev).scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(cap // block_m, device=dev) * block_m
    block_expert = torch.searchsorted(ends, block_start, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_expert.to(torch.int32), ends[-1:].to(torch.int32)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, t_ptr, sorted_ptr, bexp_ptr, npad_ptr, M, K, R,
                   stride_xm, stride_ae, stride_ar, stride_tm,
                   DOT_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    pr = tl.program_id(1)
    if b * BLOCK_M >= tl.load(npad_ptr):
        return
    tok = tl.load(sorted_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
    e = tl.load(bexp_ptr + b).to(tl.int64)
    rr = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = tok < M
    x_row = x_ptr + tok[:, None].to(tl.int64) * stride_xm
    a_row = a_ptr + e * stride_ae + rr[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + rk[None, :], mask=valid[:, None] & (rk < K)[None, :], other=0.0)
        a = tl.load(a_row + rk[:, None], mask=(rr < R)[None, :] & (rk < K)[:, None], other=0.0)
        if DOT_IEEE:
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, a.to(x.dtype))
    tl.store(t_ptr + tok[:, None] * stride_tm + rr[None, :], acc, mask=valid[:, None] & (rr < R)[None, :])


@triton.jit
def _expand_kernel(t_ptr, b_ptr, y_ptr, sorted_ptr, bexp_ptr, npad_ptr, M, N, R,
                   stride_tm, stride_be, stride_bn, stride_ym,
                   DOT_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0)
    pn = tl.program_id(1)
    if b * BLOCK_M >= tl.load(npad_ptr):
        return
    tok = tl.load(sorted_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
    e = tl.load(bexp_ptr + b).to(tl.int64)
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
    ptrs = y_ptr + tok[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


SHRINK_BLOCK_K = 64
EXPAND_BLOCK_N = 64


def rank_block(R: int) -> int:
    return max(16, triton.next_power_of_2(R))


def lowrank_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, expert_ids: torch.Tensor,
                 *, block_m: int = 16, exact: bool | None = None,
                 aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`y[m] += (x[m] · a[e(m)]ᵀ) · b[e(m)]ᵀ` in place. `y` float32 `[M, N]`, `x` `[M, K]`, `a` `[E, R, K]`,
    `b` `[E, N, R]` (views with unit stride on the last dim), `expert_ids` `[M]`. `aligned`: the result of
    `align_tokens(expert_ids, E, block_m)` when the caller already has it (e.g. shared by several layers)."""
    M, K = x.shape
    E, R, _ = a.shape
    N = b.shape[1]
    if M == 0:
        return y
    sorted_ids, bexp, npad = aligned if aligned is not None else align_tokens(expert_ids, E, block_m)
    t = torch.empty(M, R, device=x.device, dtype=torch.float32)
    ieee = x.dtype == torch.float32 if exact is None else exact
    br = rank_block(R)
    blocks = bexp.numel()
    launcher.launch(_shrink_kernel, (blocks, triton.cdiv(R, br)),
        x, a, t, sorted_ids, bexp, npad, M, K, R, x.stride(0), a.stride(0), a.stride(1), t.stride(0),
        DOT_IEEE=ieee, BLOCK_M=block_m, BLOCK_R=br, BLOCK_K=SHRINK_BLOCK_K)
    launcher.launch(_expand_kernel, (blocks, triton.cdiv(N, EXPAND_BLOCK_N)),
        t, b, y, sorted_ids, bexp, npad, M, N, R, t.stride(0), b.stride(0), b.stride(1), y.stride(0),
        DOT_IEEE=ieee, BLOCK_M=block_m, BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=br)
    return y
