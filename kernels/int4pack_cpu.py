"""torch's CPU int4 layout: conversion from the checkpoint, the token-count dispatch (torch's int4 GEMM or
dequantize + dense GEMM), its opaque ops (`vllm_qe::int4pack_linear`, `vllm_qe::qe_moe_int4pack`) and the kernel
classes that serve linear (`Int4PackCPUKernel`) and MoE (`Int4PackMoEKernel`) layers with it.

Torch reference twin: `kernels.reference.base_gemm` / `fused_moe` on the dequantized weight (tests/test_cpu_prefill.py).
"""

from __future__ import annotations

import functools
import os

import torch

from vllm_qe.format import spec
from vllm_qe.format.packing import unpack
from vllm_qe.kernels import reference
from vllm_qe.kernels.adapters import pair as _pair
from vllm_qe.kernels.base import (
    KernelTarget,
    QEGemmKernel,
    QELayerSpec,
    QEMoEKernel,
    drop_checkpoint_tensors,
    zero_data,
)

INT4PACK_GROUPS = (256, 128, 64, 32)  # group sizes `_weight_int4pack_mm_for_cpu` accepts, largest first


class Int4PackCPUKernel(QEGemmKernel):
    """torch's CPU int4 layout, run by `int4pack_linear` (int4 GEMM or dequantize + GEMM by token count): weight
    `[out, in/2]` uint8 (two 4-bit values per byte, torch's layout) and `[G', out, 2]` (scale, offset) in the
    activation dtype, where torch computes `w = (q - 8)·s + o`.
    The format's `w = (q - z)·s` maps exactly with `o = (8 - z)·s` (exact in float32: both products are multiples
    of the float16 scale's last bit); 2/3-bit values are held in 4 bits. Groups of 16 (or per-channel rows that
    no accepted group divides) are rejected; a group that is a multiple of an accepted size repeats its scale."""

    @classmethod
    def can_implement(cls, c: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        if target.device != "cpu":
            return False, "CPU only"
        if c.bits > 4:
            return False, f"{c.bits}-bit values do not fit torch's int4 layout"
        if c.act_type not in (torch.bfloat16, torch.float16, torch.float32):
            return False, f"activation dtype {c.act_type}"
        if c.out_p % 16:
            return False, f"output size per partition {c.out_p} is not a multiple of 16"
        if int4pack_group(c) is None:
            return False, f"group_size {c.group_size} with input size {c.in_p}: no group size in {INT4PACK_GROUPS}"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w, sz = int4pack(layer.weight_packed.data, layer.weight_scale.data, zero_data(layer), self.c)
        drop_checkpoint_tensors(layer)
        layer.qe_w4 = torch.nn.Parameter(w, requires_grad=False)
        layer.qe_w4_sz = torch.nn.Parameter(sz, requires_grad=False)
        layer.qe_w4_group = int4pack_group(self.c)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.to(layer.qe_w4_sz.dtype).contiguous()
        return torch.ops.vllm_qe.int4pack_linear(x, layer.qe_w4, layer.qe_w4_group, layer.qe_w4_sz)


def int4pack_group(c: QELayerSpec) -> int | None:
    g = c.in_p if c.group_size == -1 else c.group_size
    return next((a for a in INT4PACK_GROUPS if g % a == 0 and c.in_p % a == 0), None)


def int4pack(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, c: QELayerSpec
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint tensors (`packed` `[out, words]`, `scale` `[out, G]` fp16, `zero` `[out, G]` uint8 or None) ->
    torch's CPU int4 weight `[out, in/2]` uint8 and scale/offset `[in/g', out, 2]` in `c.act_type`."""
    in_f, g = c.in_p, int4pack_group(c)
    q = unpack(packed, c.bits, in_f)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    s = scale.float()
    z = torch.full_like(s, 2 ** (c.bits - 1)) if zero is None else zero.float()
    groups = torch.arange(in_f // g) * g // (in_f if c.group_size == -1 else c.group_size)
    s, z = s[:, groups], z[:, groups]
    sz = torch.stack([s.t(), ((8 - z) * s).t()], dim=-1).contiguous().to(c.act_type)
    return w, sz


# -- M-dependent CPU dispatch on torch's int4 layout -------------------------------------------------------------------
# torch's int4 GEMM re-dequantizes the weight for every block of 4 rows, so its cost grows linearly with the tokens
# (1536x8960 g128, bf16, 1 thread: ~0.3-0.6 ms per token), while dequantizing the weight once (`int4pack_dequantize`,
# vectorized torch ops: ~12-24 ms for those 13.8 M weights) and calling the dense GEMM (oneDNN) costs about the same at
# any size up to ~100 tokens. Measured on the project's 2-core machine under load (`benchmarks/cpu_serving.py`'s base
# GEMM table, same run: int4 vs dequant + GEMM): 32 tokens 17-20 vs 25-27 ms, 64 tokens 39 vs 28-33 ms, 128 tokens
# 77-83 vs 30-46 ms, so the crossover is ~48 tokens. The rule is per call (per expert in the MoE op).
INT4_DEQUANT_MIN_TOKENS = int(os.environ.get("VLLM_QE_INT4_DEQUANT_MIN_TOKENS", "48"))
DEQUANT_CHUNK_ELEMS = 1 << 21  # weights dequantized per chunk of output columns (4 MiB in bf16): bounded temporaries


@functools.cache
def int4pack_layout() -> tuple[int, str] | None:
    """How `_convert_weight_to_int4pack_for_cpu` lays out nibbles on this CPU (torch 2.13, int4mm_kernel.cpp): the
    `[N, K]` grid is cut into blocks of `block_n` output rows, each stored as `[K, block_n/2]` bytes. In a full
    block byte `j` holds row `j` (low nibble) and row `j + block_n/2` (high nibble) ("halves": AVX512 with block 64,
    AVX2 with block 32) or rows `2j` / `2j+1` ("pairs": unvectorized build, block 32); a last partial block (16,
    32 or 48 rows) is always "pairs". The layout follows torch's dispatch CPU capability, so it is probed once on a
    small grid; None if no known layout reproduces it (then the int4 GEMM runs at every size)."""
    for layout in ((64, "halves"), (32, "halves"), (32, "pairs")):
        n, k = 2 * layout[0] + 16, 64
        q = (torch.arange(n * k, dtype=torch.int32).view(n, k) * 7 + torch.arange(n, dtype=torch.int32)[:, None]) % 16
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        sz = torch.stack([torch.ones(1, n), torch.full((1, n), 8.0)], dim=-1)  # w = (q - 8)·1 + 8 = q
        if torch.equal(int4pack_dequantize(w4, sz, k, 0, n, layout), q.t().float()):
            return layout
    return None


def int4pack_dequantize(w4: torch.Tensor, sz: torch.Tensor, group: int, n0: int, n1: int,
                        layout: tuple[int, str]) -> torch.Tensor:
    """Output rows `[n0, n1)` of a torch int4pack weight (`w4` `[N, K/2]` uint8, `sz` `[K/group, N, 2]` (scale,
    offset) in the activation dtype) dequantized as torch's kernel does, `w = (q - 8)·s + o`, one rounding to
    `sz.dtype`; returned transposed, `[K, n1 - n0]` (the GEMM's `[K, N]` operand). `n0` is a multiple of the block.
    Vectorized torch ops on whole blocks: nibbles -> int8 `q - 8` -> `sz.dtype` (with the block's row permutation)
    -> one `addcmul` with the group's scale and offset."""
    block, kind = layout
    N, K = w4.shape[0], w4.shape[1] * 2
    full = N // block * block
    flat = w4.view(-1)
    w = torch.empty(K, n1 - n0, dtype=sz.dtype, device=w4.device)
    for a, b in ((n0, min(n1, full)), (max(n0, full), n1)):  # whole blocks, then the partial last block
        if a >= b:
            continue
        nb = block if a < full else b - a
        src = flat[a * K // 2:b * K // 2].view(-1, K, nb // 2)  # [blocks, K, nb/2]
        lo = (src & 15).view(torch.int8).sub_(8).permute(1, 0, 2)
        hi = (src >> 4).view(torch.int8).sub_(8).permute(1, 0, 2)
        dst = w[:, a - n0:b - n0]
        if kind == "halves" and a < full:
            dst = dst.view(K, -1, 2, nb // 2)
            dst[:, :, 0].copy_(lo)
            dst[:, :, 1].copy_(hi)
        else:
            dst = dst.view(K, -1, nb // 2, 2)
            dst[..., 0].copy_(lo)
            dst[..., 1].copy_(hi)
    wg = w.view(K // group, group, n1 - n0)
    s, o = sz[:, n0:n1, 0].contiguous().unsqueeze(1), sz[:, n0:n1, 1].contiguous().unsqueeze(1)
    torch.addcmul(o, wg, s, out=wg)
    return w


def int4pack_mm(x: torch.Tensor, w4: torch.Tensor, group: int, sz: torch.Tensor,
                min_tokens: int | None = None) -> torch.Tensor:
    """`x` `[T, K]` (in `sz.dtype`) times a torch int4pack weight -> `[T, N]`: torch's int4 GEMM below `min_tokens`
    tokens (default `INT4_DEQUANT_MIN_TOKENS`; float32: never), else the weight dequantized in chunks of output columns
    (`DEQUANT_CHUNK_ELEMS` weights each, so the temporary stays bounded) and the dense GEMM (oneDNN)."""
    layout = int4pack_layout()
    if min_tokens is None:  # float32: torch's int4 GEMM is slower at every size (1 token: 57 vs 31 ms, same run)
        min_tokens = 1 if sz.dtype == torch.float32 else INT4_DEQUANT_MIN_TOKENS
    if x.shape[0] < min_tokens or layout is None:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, group, sz)
    N, K = w4.shape[0], w4.shape[1] * 2
    step = max(layout[0], DEQUANT_CHUNK_ELEMS // K // layout[0] * layout[0])
    outs = [x @ int4pack_dequantize(w4, sz, group, n0, min(N, n0 + step), layout) for n0 in range(0, N, step)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@torch.library.custom_op("vllm_qe::int4pack_linear", mutates_args=())
def int4pack_linear(x: torch.Tensor, w4: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """`int4pack_mm` as one opaque op: the token-count branch happens at run time, so vLLM's compiled graph (dynamic
    token dimension) neither specializes nor guards on it."""
    return int4pack_mm(x, w4, group, sz)


@int4pack_linear.register_fake
def _(x, w4, group, sz):
    return x.new_empty(x.shape[0], w4.shape[0])


@torch.library.custom_op("vllm_qe::qe_moe_int4pack", mutates_args=())
def qe_moe_int4pack(
    x: torch.Tensor,
    w13: torch.Tensor,
    sz13: torch.Tensor,
    group13: int,
    w2: torch.Tensor,
    sz2: torch.Tensor,
    group2: int,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    a13: torch.Tensor | None,
    b13: torch.Tensor | None,
    a2: torch.Tensor | None,
    b2: torch.Tensor | None,
    smooth13: torch.Tensor | None,
    smooth2: torch.Tensor | None,
) -> torch.Tensor:
    """SwiGLU MoE on CPU with every expert kept in torch's int4 layout (`w13` `[E, 2I, H/2]` uint8, `sz13`
    `[E, H/g, 2I, 2]`; `w2` `[E, H, I/2]`, `sz2` `[E, I/g, H, 2]`, see `int4pack`): one
    `int4pack_mm` per active expert and projection (torch's int4 GEMM for few tokens, dequantize +
    dense GEMM for many). `smooth13` `[E, H]` / `smooth2` `[E, I]`
    divide the expert's inputs; adapters as in `reference.fused_moe`."""
    dt = sz13.dtype

    def gemm13(e: int, xe: torch.Tensor) -> torch.Tensor:
        xs = xe if smooth13 is None else xe.float() / smooth13[e]
        return int4pack_mm(xs.to(dt).contiguous(), w13[e], group13, sz13[e])

    def gemm2(e: int, a: torch.Tensor) -> torch.Tensor:
        xs = a if smooth2 is None else a.float() / smooth2[e]
        return int4pack_mm(xs.to(dt).contiguous(), w2[e], group2, sz2[e])

    return reference.fused_moe_with(x, gemm13, gemm2, w2.shape[1], topk_ids, topk_weights, _pair(a13, b13),
                                    _pair(a2, b2))


@qe_moe_int4pack.register_fake
def _(x, w13, sz13, group13, w2, sz2, group2, topk_ids, topk_weights, a13, b13, a2, b2, smooth13, smooth2):
    return x.new_empty(x.shape[0], w2.shape[1])




class Int4PackMoEKernel(QEMoEKernel):
    """Every expert in torch's int4 layout (`qe_w13_w4` `[E, 2I, H/2]`, `qe_w13_sz` `[E, H/g, 2I, 2]`, likewise
    w2), run by `vllm_qe::qe_moe_int4pack`: one `int4pack_mm` per active expert and projection. x86 vLLM has no
    int4 fused MoE; 2/3/4-bit grids, groups of 32..256."""

    @classmethod
    def can_implement(cls, c13: QELayerSpec, c2: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        for c in (c13, c2):
            ok, why = Int4PackCPUKernel.can_implement(c, target)
            if not ok:
                return False, why
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Convert one expert at a time (bounded temporaries), then drop the checkpoint tensors."""
        E = layer.qe_dims[0]
        for stem, c in (("w13", self.c13), ("w2", self.c2)):
            packed = getattr(layer, f"{stem}_{spec.WEIGHT_PACKED}").data
            scale = getattr(layer, f"{stem}_{spec.WEIGHT_SCALE}").data
            zero = zero_data(layer, f"{stem}_")
            ws, szs = zip(*(int4pack(packed[e], scale[e], None if zero is None else zero[e], c) for e in range(E)))
            drop_checkpoint_tensors(layer, f"{stem}_")
            setattr(layer, f"qe_{stem}_w4", torch.nn.Parameter(torch.stack(ws), requires_grad=False))
            setattr(layer, f"qe_{stem}_sz", torch.nn.Parameter(torch.stack(szs), requires_grad=False))
        layer.qe_groups = (int4pack_group(self.c13), int4pack_group(self.c2))

    def apply(self, layer, x, topk_ids, topk_weights, adapters, smooth):
        return torch.ops.vllm_qe.qe_moe_int4pack(x, layer.qe_w13_w4, layer.qe_w13_sz, layer.qe_groups[0],
                                                 layer.qe_w2_w4, layer.qe_w2_sz, layer.qe_groups[1], topk_ids,
                                                 topk_weights, *adapters, *smooth)
