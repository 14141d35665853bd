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

from vllm_qe.kernels.triton import launcher
from vllm_qe.kernels.triton.gemm import GemmTile, _mainloop, _store_tile, k_block
from vllm_qe.kernels.triton.lora import align_tokens, lowrank_add_

# Tile per alignment block size: 16-row blocks (decode, few tokens per expert) compute yᵀ = W·xᵀ so that
# Hopper's wgmma (M >= 64) applies; larger blocks use the plain orientation.
MOE_TILES: dict[int, GemmTile] = {
    16: GemmTile(16, 64, 128, 4, 3, swap_ab=True),
    64: GemmTile(64, 128, 64, 8, 3),
}


def moe_block_m(rows: int, num_experts: int) -> int:
    """Alignment block (rows per program) from shapes alone: 64 once experts average 64 (token, slot) rows
    (prefill), else 16 (decode: most experts get a few rows, padding stays small)."""
    return 64 if rows >= 64 * num_experts else 16


@triton.jit
def _moe_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, sorted_ptr, bexp_ptr, npad_ptr,
    num_rows, N, K, P, group_size, row_div,
    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_sg, stride_ym,
    BITS: tl.constexpr, SYM: tl.constexpr, PER_TILE_GROUP: tl.constexpr, SWAP_AB: tl.constexpr,
    DOT_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[row, n] = Σ_k x[row // row_div, k] · Wdeq[e(row), n, k] for the rows of block `program_id(0)`; blocks
    past `*npad_ptr` rows return at once (their count is only known on the device)."""
    b = tl.program_id(0)
    pn = tl.program_id(1)
    if b * BLOCK_M >= tl.load(npad_ptr):
        return
    row = tl.load(sorted_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = row < num_rows
    e = tl.load(bexp_ptr + b).to(tl.int64)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    x_row = x_ptr + (row // row_div)[:, None].to(tl.int64) * stride_xm
    acc = _mainloop(x_row, valid, w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_se, s_ptr, rn,
                    N, K, P, group_size, 0, tl.cdiv(K, BLOCK_K), 1, stride_wn, stride_sn, stride_sg, BITS, SYM,
                    False, False, PER_TILE_GROUP, SWAP_AB, DOT_IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    _store_tile(y_ptr, acc, row, rn, valid, rn < N, stride_ym, 1, SWAP_AB, False)


def moe_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
             group_size: int, sorted_rows: torch.Tensor, block_expert: torch.Tensor, num_rows: int, row_div: int,
             block_m: int, num_padded: torch.Tensor | None = None) -> torch.Tensor:
    """float32 `[num_rows, N]`; row r reads input row `r // row_div` and the weights of its block's expert.
    `num_padded` int32 `[1]`: rows of `sorted_rows` in use (`align_tokens`); None = all of them.
    `scale`/`zero` `[E, N, G]` in either memory layout (`gemm.kernel_layout` makes the vectorizable one)."""
    E, N, P = packed.shape
    K = x.shape[1]
    gs = K if group_size == -1 else group_size
    y = torch.zeros(num_rows, N, device=x.device, dtype=torch.float32)
    if num_padded is None:
        num_padded = torch.full((1,), sorted_rows.numel(), dtype=torch.int32, device=x.device)
    z = zero if zero is not None else scale
    tile = MOE_TILES.get(block_m, GemmTile(block_m, 64, 64, 4, 3))
    bk, per_tile = k_block(tile.block_k, bits, gs, K)
    if x.stride(1) != 1:
        x = x.contiguous()
    launcher.launch(_moe_gemm_kernel, (block_expert.numel(), triton.cdiv(N, tile.block_n)),
        x, packed, scale, z, y, sorted_rows, block_expert, num_padded, num_rows, N, K, P, gs, row_div,
        x.stride(0), packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1), scale.stride(2),
        y.stride(0), BITS=bits, SYM=zero is None, PER_TILE_GROUP=per_tile, SWAP_AB=tile.swap_ab,
        DOT_IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=tile.block_n, BLOCK_K=bk,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return y


def fused_moe_qe(
    x: torch.Tensor, w13: tuple, w2: tuple, bits: int, group_size: int | tuple[int, int], topk_ids: torch.Tensor,
    topk_weights: torch.Tensor, adapters13: tuple | None = None, adapters2: tuple | None = None,
    block_m: int | None = None, smooth13: torch.Tensor | None = None, smooth2: torch.Tensor | None = None,
) -> torch.Tensor:
    """SwiGLU MoE: `x` `[T, H]`; `w13` = (packed `[E, 2I, P]`, scale, zero|None) with gate rows first; `w2` =
    (packed `[E, H, P']`, ...); `topk_ids`/`topk_weights` `[T, k]`; adapters = (A `[E, r, in]`, B `[E, out, r]`)
    per expert (QE's shared expert of each MoE expert) or None; `block_m`: rows per alignment block (None:
    `moe_block_m`, a function of the shapes); `group_size` may differ per GEMM (w13, w2);
    `smooth13` `[E, H]` / `smooth2` `[E, I]`: per-expert smoothing, the GEMM (not the adapters) reads `x / s`
    (rows are then materialised per (token, slot)). Returns `[T, H]` in x.dtype."""
    gs13, gs2 = group_size if isinstance(group_size, tuple) else (group_size, group_size)
    T, k = topk_ids.shape
    E = w13[0].shape[0]
    rows = T * k
    row_expert = topk_ids.reshape(-1)
    block_m = moe_block_m(rows, E) if block_m is None else block_m
    aligned = align_tokens(row_expert, E, block_m)
    sorted_rows, bexp, npad = aligned
    if smooth13 is None:
        h = moe_gemm(x, *w13, bits, gs13, sorted_rows, bexp, rows, k, block_m, npad)
    else:
        xs = (x.repeat_interleave(k, dim=0).float() / smooth13[row_expert].float()).to(x.dtype)
        h = moe_gemm(xs, *w13, bits, gs13, sorted_rows, bexp, rows, 1, block_m, npad)
    if adapters13 is not None:
        lowrank_add_(h, x.repeat_interleave(k, dim=0), adapters13[0], adapters13[1], row_expert, block_m=block_m,
                     aligned=aligned)
    inter = h.shape[1] // 2
    act = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)
    act_in = act if smooth2 is None else (act.float() / smooth2[row_expert].float()).to(x.dtype)
    o = moe_gemm(act_in, *w2, bits, gs2, sorted_rows, bexp, rows, 1, block_m, npad)
    if adapters2 is not None:
        lowrank_add_(o, act, adapters2[0], adapters2[1], row_expert, block_m=block_m, aligned=aligned)
    return (o.view(T, k, -1) * topk_weights.unsqueeze(-1).float()).sum(1).to(x.dtype)
