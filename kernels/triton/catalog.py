"""What the runtime can launch, for the ahead-of-time report (`python -m vllm_qe.kernels.aot`).

Each own Triton kernel lists its launch configurations here, typed as a real launch specializes them: bf16
activations, int32 packed words, fp16 scales and u8 zero points in the N-major layout (`gemm.kernel_layout`),
float32 outputs, unit strides as constants, every pointer and every size divisible by 16 as such (true for the
Qwen2-VL benchmark shapes; M and the split size are not). `launches(sms)` gives the configuration, programs and
bytes of each benchmark call, computed by the same planning functions the wrappers call.
"""

from __future__ import annotations

import math
from typing import Any

from vllm_qe.kernels.aot import BENCH_M, BENCH_SHAPES, Variant
from vllm_qe.kernels.triton import gemm, lora, moe

BITS = (3, 4, 8)
GROUP = 128  # group size of the benchmark checkpoints
SMALL_GROUPS = (32, 64)  # groups smaller than a tile's BLOCK_K: compiled for 4-bit weights

LEGEND = [
    "Columns: `regs` per thread and `spills` from ptxas; `smem` = shared memory per program (Triton metadata); "
    "`LDG.E.128`/`LDG.E.64` = 128/64-bit global loads, `LDG scalar` = 32-bit-or-narrower ones, `LDGSTS.128` = "
    "16-byte async global->shared copies (cp.async, software pipelining), `LDGSTS other` = 64-bit or narrower ones; MMA = "
    "tensor-core instructions in the SASS (HMMA/IMMA: mma.sync fp16-bf16/int8; HGMMA/IGMMA: Hopper wgmma).",
    "Configuration: `BM/BN/BK` block sizes, `w` warps, `s` pipeline stages, `swapAB` = `yᵀ = W·xᵀ` (N is the "
    "MMA's M), `atomic` = split-K partial sums added atomically, `W<b>A16` = bf16 activations, `W<b>A8` = int8 "
    "activations and int8 MMA, `ckpt-scales` = scales in the checkpoint's `[N, G]` row-major layout instead of "
    "the N-major one `gemm.kernel_layout` makes, `per-elem` = group size smaller than a K tile (3-bit, group 16), "
    "`(group 32/64)` = the tile's BLOCK_K shrunk to a smaller group (4-bit; group 128 and per-channel use the "
    "table's BLOCK_K).",
]
LAUNCH_NOTES = [
    f"W4 asymmetric, group {GROUP}, bf16 activations (A16) and int8 activations (A8); programs = grid size incl. "
    "split-K. `min bytes` = packed weights + fp16 scales + u8 zero points + activations + float32 output, each "
    "once; `tiled bytes` = what the tiling requests from memory if L2 never hit (weights once per M tile, "
    "activations once per N tile); `HBM floor` = min bytes / HBM bandwidth. The split-K and A8 quantization "
    "kernels' extra traffic (zeroing/atomics of the float32 output, the int8 copy of x) is included in "
    "`min bytes` for those rows.",
]

_I32 = "i32"


def _gemm_variant(tile: gemm.GemmTile, bits: int, int8: bool, atomic: bool, ckpt_scales: bool = False,
                  per_elem: bool = False) -> Variant:
    types = {"x_ptr": "*i8" if int8 else "*bf16", "xs_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*fp16",
             "z_ptr": "*u8", "sm_ptr": "*bf16", "y_ptr": "*fp32",
             **dict.fromkeys(["M", "N", "K", "P", "group_size", "tiles_per_split", "stride_xm", "stride_wn",
                              "stride_ym"], _I32)}
    consts: dict[str, Any] = {"stride_xk": 1, "stride_yn": 1}
    if ckpt_scales:
        types["stride_sn"] = _I32
        consts["stride_sg"] = 1
    else:
        types["stride_sg"] = _I32
        consts["stride_sn"] = 1
    bk = 32 if per_elem else tile.block_k
    consts.update(BITS=bits, SYM=False, HAS_SMOOTH=False, INT8=int8, PER_TILE_GROUP=not per_elem,
                  SWAP_AB=tile.swap_ab, ATOMIC=atomic, DOT_IEEE=False, BLOCK_M=tile.block_m,
                  BLOCK_N=tile.block_n, BLOCK_K=bk)
    label = GemmLabel(tile, bk, bits, int8, atomic, ckpt_scales, per_elem)
    unaligned = {"M", "tiles_per_split"} | ({"stride_sn"} if ckpt_scales else set())
    return Variant("qe_gemm", label, gemm._qe_gemm_kernel, types, consts, tile.num_warps, tile.num_stages,
                   frozenset(unaligned), {"bits": bits, "int8": int8})


def GemmLabel(tile: gemm.GemmTile, bk: int, bits: int, int8: bool, atomic: bool, ckpt: bool, per_elem: bool) -> str:
    t = gemm.GemmTile(tile.block_m, tile.block_n, bk, tile.num_warps, tile.num_stages, tile.swap_ab).label()
    extra = [" atomic" if atomic else "", " ckpt-scales" if ckpt else "", " per-elem g16" if per_elem else ""]
    return f"W{bits}A{8 if int8 else 16} {t}" + "".join(extra)


def gemm_variants() -> list[Variant]:
    out = []
    for int8 in (False, True):
        for bits in BITS:
            for max_m, tile in gemm.tile_table(int8, bits):
                # tiles up to SPLIT_K_MAX_M split K (atomic stores) unless the output tiles fill the GPU
                for atomic in ((True, False) if max_m <= gemm.SPLIT_K_MAX_M else (False,)):
                    out.append(_gemm_variant(tile, bits, int8, atomic))
    # smaller groups shrink BLOCK_K to the group (`gemm.k_block`): those tiles for the common 4-bit weights
    for group in SMALL_GROUPS:
        for int8 in (False, True):
            for max_m, tile in gemm.tile_table(int8, 4):
                bk, per_tile = gemm.k_block(tile.block_k, 4, group, 1 << 20)
                if bk == tile.block_k:
                    continue
                small = gemm.GemmTile(tile.block_m, tile.block_n, bk, tile.num_warps, tile.num_stages, tile.swap_ab)
                for atomic in ((True, False) if max_m <= gemm.SPLIT_K_MAX_M else (False,)):
                    v = _gemm_variant(small, 4, int8, atomic)
                    out.append(Variant(v.kernel, f"{v.config} (group {group})", v.fn, v.types, v.constexprs,
                                       v.num_warps, v.num_stages, v.unaligned, v.tags))
    decode = gemm.TILES_A16[0][1]
    out.append(_gemm_variant(decode, 4, False, True, ckpt_scales=True))
    out.append(_gemm_variant(decode, 3, False, True, per_elem=True))
    out.append(Variant("quantize_activations", "A8 BK1024 w4", gemm._quant_act_kernel,
                       {"x_ptr": "*bf16", "sm_ptr": "*bf16", "amax_ptr": "*fp32", "xq_ptr": "*i8", "xs_ptr": "*fp32",
                        "K": _I32, "stride_xm": _I32, "stride_qm": _I32},
                       {"HAS_SMOOTH": True, "HAS_AMAX": False, "ACT_BITS": 8, "BLOCK_K": 1024}, 4, 1))
    return out


def aot_variants() -> list[Variant]:
    return gemm_variants() + moe_variants() + lora_variants()


# MoE benchmark shape: a Qwen3-VL-30B-A3B-like expert layer (hidden 2048, expert width 768, 128 experts, top-8).
MOE_SHAPE = {"hidden": 2048, "inter": 768, "experts": 128, "top_k": 8}
# Routed adapters of the benchmark (kernels/bench.py): 8 experts of rank 32 on the Qwen2-VL-2B layers.
LORA_EXPERTS, LORA_RANKS = 8, (32, 64)


def moe_variants() -> list[Variant]:
    """`fused_moe_qe` as the runtime calls it: 16-row alignment blocks (swap-AB tile) or 64 (`moe_block_m`)."""
    out = []
    for block_m, bits in ((b, w) for b in sorted(moe.MOE_TILES) for w in BITS):
        tile = moe.MOE_TILES[block_m]
        types = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "y_ptr": "*fp32",
                 "sorted_ptr": "*i32", "bexp_ptr": "*i32", "npad_ptr": "*i32",
                 **dict.fromkeys(["num_rows", "N", "K", "P", "group_size", "row_div", "stride_xm", "stride_we",
                                  "stride_wn", "stride_se", "stride_sg", "stride_ym"], _I32)}
        consts = dict(stride_sn=1, BITS=bits, SYM=False, PER_TILE_GROUP=True, SWAP_AB=tile.swap_ab, DOT_IEEE=False,
                      BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
        out.append(Variant("moe_gemm", f"W{bits}A16 {tile.label()}", moe._moe_gemm_kernel, types, consts,
                           tile.num_warps, tile.num_stages, frozenset({"num_rows", "row_div"}), {"bits": bits}))
    return out


def lora_variants() -> list[Variant]:
    """Shrink/expand per rank block and alignment block (16: linear layers and MoE decode; 64: MoE prefill)."""
    out = []
    for r, bm in ((r, bm) for bm in sorted(moe.MOE_TILES) for r in LORA_RANKS):
        br = lora.rank_block(r)
        ints = ["M", "K", "R", "N", "stride_xm", "stride_ae", "stride_ar", "stride_tm", "stride_be", "stride_bn",
                "stride_ym"]
        idx = {"sorted_ptr": "*i32", "bexp_ptr": "*i32", "npad_ptr": "*i32", **dict.fromkeys(ints, _I32)}
        out.append(Variant("lora_shrink", f"rank {r}: BM{bm} BR{br} BK{lora.SHRINK_BLOCK_K} w4", lora._shrink_kernel,
                           {"x_ptr": "*bf16", "a_ptr": "*bf16", "t_ptr": "*fp32", **idx},
                           dict(DOT_IEEE=False, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=lora.SHRINK_BLOCK_K)))
        out.append(Variant("lora_expand", f"rank {r}: BM{bm} BN{lora.EXPAND_BLOCK_N} BR{br} w4", lora._expand_kernel,
                           {"t_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*fp32", **idx},
                           dict(DOT_IEEE=False, BLOCK_M=bm, BLOCK_N=lora.EXPAND_BLOCK_N, BLOCK_R=br)))
    return out


def gemm_launches(sms: int) -> list[dict[str, Any]]:
    rows = []
    for model, layer, n, k in BENCH_SHAPES:
        for act in (0, 8):
            for m in BENCH_M:
                lp = gemm.plan(m, n, k, 4, GROUP, act, sms)
                gm, gn, sk = lp.grid(m, n)
                b = gemm.bytes_moved(m, n, k, 4, GROUP, act)
                if act:
                    b += m * k * (2 + 1) + m * 4  # quantization kernel: read bf16 x, write int8 x and scales
                if sk > 1:
                    b += m * n * 4 * (1 + sk)  # zero the float32 output + one atomic add per split
                w = n * math.ceil(k * 4 / 32) * 4 + n * math.ceil(k / GROUP) * 3
                tiled = w * gm + m * k * (1 if act else 2) * gn + m * n * 4 * sk
                rows.append({"kernel": f"qe_gemm W4A{act or 16}", "model": model, "layer": layer, "n": n, "k": k,
                             "m": m, "config": lp.label(), "programs": gm * gn * sk, "bytes": b,
                             "tiled_bytes": tiled})
    return rows


def moe_launches(sms: int) -> list[dict[str, Any]]:
    """Both expert GEMMs at T tokens; weights of min(E, T·k) experts (the most a routing can touch)."""
    h, inter, e, k = (MOE_SHAPE[key] for key in ("hidden", "inter", "experts", "top_k"))
    rows_out = []
    for name, n, kk in (("w13", 2 * inter, h), ("w2", h, inter)):
        for t in BENCH_M:
            rows = t * k
            bm = moe.moe_block_m(rows, e)
            tile = moe.MOE_TILES[bm]
            blocks = lora.max_padded_rows(rows, e, bm) // bm
            active = min(e, rows)
            w = active * (n * math.ceil(kk * 4 / 32) * 4 + n * math.ceil(kk / GROUP) * 3)
            b = w + rows * kk * 2 + rows * n * 4
            used_blocks = min(blocks, math.ceil(rows / bm) + active)
            rows_out.append({"kernel": "moe_gemm W4A16", "model": f"MoE E{e} top{k}", "layer": name, "n": n, "k": kk,
                             "m": t, "config": f"{tile.label()} (blocks: {blocks} launched, <= {used_blocks} work)",
                             "programs": blocks * math.ceil(n / tile.block_n), "bytes": b,
                             "tiled_bytes": w / active * used_blocks + blocks * bm * kk * 2 * math.ceil(n / tile.block_n)})
    return rows_out


def lora_launches(sms: int) -> list[dict[str, Any]]:
    """Routed adapters (8 experts, rank 32) on the 2B qkv and gate_up layers: shrink then expand."""
    r, e = LORA_RANKS[0], LORA_EXPERTS
    rows_out = []
    for _, layer, n, k in BENCH_SHAPES[:3:2]:
        for m in BENCH_M:
            blocks = lora.max_padded_rows(m, e, 16) // 16
            active = min(e, m)
            shrink = m * k * 2 + active * r * k * 2 + m * r * 4
            expand = m * r * 4 + active * n * r * 2 + 2 * m * n * 4
            for kern, nn, kk, b, progs, tiled in (
                    ("lora_shrink", r, k, shrink, blocks, blocks * 16 * k * 2 + blocks * r * k * 2),
                    ("lora_expand", n, r, expand, blocks * math.ceil(n / lora.EXPAND_BLOCK_N),
                     blocks * (n * r * 2 + 16 * n * 8))):
                rows_out.append({"kernel": kern, "model": f"2b, {e} experts r{r}", "layer": layer, "n": nn, "k": kk,
                                 "m": m, "config": f"BM16, {blocks} blocks launched", "programs": progs, "bytes": b,
                                 "tiled_bytes": tiled})
    return rows_out


def launches(sms: int) -> list[dict[str, Any]]:
    return gemm_launches(sms) + moe_launches(sms) + lora_launches(sms)
