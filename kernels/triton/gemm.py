"""Low-bit GEMM with in-kernel dequantization of the checkpoint's packed layout (no repacking).

`y[m, n] = Σ_g s[n, g] · Σ_{k∈g} x̃[m, k] · (q[n, k] - z[n, g])`, `q` read from the little-endian bitstream of
`weight_packed` (2/3/4/8 bits; 3-bit values may straddle two words). Two data paths:

- **A16** (`act_bits=0`): each packed int32 word is loaded once (a `[BLOCK_N, BLOCK_K·bits/32]` tile, contiguous
  along K, so 128-bit loads) and unpacked in registers; `q - z` becomes float exactly (exponent-bias trick, no
  int->float conversion instruction) and is fed to a bf16/fp16 tensor-core dot as small integers; the per-group
  scale multiplies the dot's `[BLOCK_M, BLOCK_N]` partial product ("accumulate per group, then scale": one tile
  never straddles two groups), not every weight element. Optional smoothing divides `x` per input channel.
- **A8/A6/A4** (`act_bits>0`): a small kernel quantizes each token once to int8 (`x/s` rounded half-to-even,
  per-token scale `max|x/s| / qmax`, smoothing fused); the GEMM then runs int8 x int8 -> int32 dots of `x_q` with
  `q - 2^(b-1)` (int8 for b <= 8), the zero-point correction `(z - 2^(b-1)) · Σ_{k∈tile} x_q` in int32, and a
  float epilogue per tile (group scale) and per token (activation scale). Exact integer math up to float32
  rounding of the epilogue (`int8_reference.qe_gemm_int8_reference` is the bit-level twin).

Small M: split-K over K tiles (`split_k` programs per output tile, float32 atomic adds into a zeroed output)
whenever the output tiles alone leave SMs idle (M=1, N=4096: 64 tiles on 132 SMs). Decode tiles compute
`yᵀ = W·xᵀ` (`swap_ab`) so that the MMA's M dimension is N: Hopper's wgmma needs M >= 64 per warpgroup, which a
16-token tile cannot give.
Group sizes that a K tile cannot align with (e.g. 16 for 3-bit, or not a multiple of 16) use a per-element
scale path (A16 only). Accumulation is float32 (int32 on the int8 path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_qe.kernels.triton import launcher


@dataclass(frozen=True)
class GemmTile:
    """One launch configuration of `_qe_gemm_kernel` (block sizes in elements)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool = False

    def label(self, split_k: int | None = None) -> str:
        s = f"BM{self.block_m} BN{self.block_n} BK{self.block_k} w{self.num_warps} s{self.num_stages}"
        s += " swapAB" if self.swap_ab else ""
        return s + (f" split{split_k}" if split_k and split_k > 1 else "")


# The launch table: (largest M, tile). Decode tiles split K; prefill tiles are wgmma-sized on Hopper.
TILES_A16: tuple[tuple[int, GemmTile], ...] = (
    (16, GemmTile(16, 64, 128, 4, 4, swap_ab=True)),
    (64, GemmTile(32, 128, 64, 8, 3)),
    (256, GemmTile(64, 128, 64, 8, 3)),
    (1 << 62, GemmTile(128, 128, 32, 8, 4)),
)
TILES_INT8: tuple[tuple[int, GemmTile], ...] = (
    (16, GemmTile(16, 64, 128, 4, 4, swap_ab=True)),
    (64, GemmTile(32, 128, 64, 4, 3)),
    (256, GemmTile(64, 64, 64, 4, 3)),
    (1 << 62, GemmTile(128, 128, 64, 8, 3)),
)
# 3-bit unpacking holds three word tiles: this tile spills at 128 registers (8 warps) with 3-bit weights (static
# report), so 3-bit layers use 4 warps instead. (The int8 M<=256 tile is BN64 for the same reason: BN128 with
# 8 warps spilled for 3-bit weights and for group-32 K tiles.)
TILES_3BIT_OVERRIDE: dict[tuple[int, bool], GemmTile] = {
    (64, False): GemmTile(32, 128, 64, 4, 3),
}
DEFAULT_NUM_SMS = 132  # H100 SXM; the real count is read from the device when there is one
MAX_SPLIT_K = 32
SPLIT_K_MAX_M = 256  # the BLOCK_M <= 64 tiles; the 128-row prefill tile never splits


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a cached host property query, no synchronisation)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def _pow2_divisor_at_most(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n (1 when n is odd)."""
    return min(cap, n & -n)


def k_block(tile_bk: int, bits: int, group_size: int, K: int) -> tuple[int, bool]:
    """(BLOCK_K, per-tile groups?) for a group size: a K tile must lie inside one group for the per-tile scale
    (per-channel -1 always does); otherwise the per-element scale path is used."""
    min_bk = 32 if bits == 3 else 16
    if group_size == -1 or group_size >= K:
        return tile_bk, True
    bk = _pow2_divisor_at_most(group_size, tile_bk)
    if bk >= min_bk:
        return bk, True
    return max(min_bk, min(tile_bk, 32)), False


def tile_table(int8: bool, bits: int) -> tuple[tuple[int, GemmTile], ...]:
    """(largest M, tile) rows the runtime picks from for this path and weight width."""
    table = TILES_INT8 if int8 else TILES_A16
    if bits == 3:
        table = tuple((m, TILES_3BIT_OVERRIDE.get((m, int8), t)) for m, t in table)
    return table


def select_tile(M: int, int8: bool, bits: int = 4) -> GemmTile:
    for max_m, tile in tile_table(int8, bits):
        if max_m >= M:
            return tile
    raise AssertionError("unreachable")


def split_k_for(M: int, N: int, K: int, tile: GemmTile, block_k: int, sms: int) -> int:
    """Split-K factor when the output tiles alone leave SMs idle (M <= SPLIT_K_MAX_M): decode aims at two
    programs per SM, larger M at one; every split gets a whole, non-empty run of K tiles."""
    if M > SPLIT_K_MAX_M:
        return 1
    tiles = triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n)
    if tiles >= sms:
        return 1
    k_tiles = triton.cdiv(K, block_k)
    target = (2 if M <= 16 else 1) * sms
    split = max(1, min(triton.cdiv(target, tiles), k_tiles, MAX_SPLIT_K))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))


@dataclass(frozen=True)
class GemmLaunch:
    """Everything the wrapper decides on the host from shapes alone (graph-safe, no data dependence)."""

    tile: GemmTile
    block_k: int
    per_tile_groups: bool
    split_k: int
    int8: bool

    def grid(self, M: int, N: int) -> tuple[int, int, int]:
        return triton.cdiv(M, self.tile.block_m), triton.cdiv(N, self.tile.block_n), self.split_k

    def label(self) -> str:
        t = self.tile
        tile = GemmTile(t.block_m, t.block_n, self.block_k, t.num_warps, t.num_stages, t.swap_ab)
        return tile.label(self.split_k)


def plan(M: int, N: int, K: int, bits: int, group_size: int, act_bits: int, sms: int = DEFAULT_NUM_SMS,
         tile: GemmTile | None = None, split_k: int | None = None) -> GemmLaunch:
    """The launch the runtime makes for these shapes (also what the AOT report compiles). The int8 MMA path needs
    K tiles of >= 32 inside one group; otherwise activation quantization runs through the float dot."""
    gs = K if group_size == -1 else group_size
    t = tile or select_tile(M, act_bits > 0, bits)
    bk, per_tile = k_block(t.block_k, bits, gs, K)
    int8 = act_bits > 0 and per_tile and bk >= 32
    if act_bits > 0 and not int8 and tile is None:
        t = select_tile(M, False, bits)
        bk, per_tile = k_block(t.block_k, bits, gs, K)
    sk = split_k if split_k is not None else split_k_for(M, N, K, t, bk, sms)
    return GemmLaunch(t, bk, per_tile, max(1, sk), int8)


@triton.jit
def _round_half_even(v):
    """torch.round semantics (ties to even), portable across Triton versions and the interpreter."""
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _load_q(w_ptr, rn, k0, N, P, stride_wn, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 `[BLOCK_N, BLOCK_K]` weight integers in [0, 2^BITS) of rows `rn`, input channels k0..k0+BLOCK_K.

    Each int32 word of the row bitstream is loaded once: for 2/4/8 bits a contiguous `[BLOCK_N, BLOCK_K·BITS/32]`
    tile (vectorized), unpacked by shifts in registers; for 3 bits the three words holding 32 values are loaded
    as three `[BLOCK_N, BLOCK_K/32]` tiles. Words at or past `P` (words per row) read as 0."""
    nmask = (rn < N)[:, None]
    row = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    if (32 % BITS) == 0:
        VPW: tl.constexpr = 32 // BITS
        BKW: tl.constexpr = BLOCK_K // VPW
        kw = k0 // VPW + tl.arange(0, BKW)
        words = tl.load(row + kw[None, :], mask=nmask & (kw < P)[None, :], other=0)
        shifts = tl.arange(0, VPW) * BITS
        q = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        return tl.reshape(q, (BLOCK_N, BLOCK_K))
    else:
        # 3-bit: 32 values in 3 words; value j of a triplet starts at bit 3j (j = 10 and 21 straddle).
        BKG: tl.constexpr = BLOCK_K // 32
        kw = (k0 // 32 + tl.arange(0, BKG)) * 3
        w0 = tl.load(row + kw[None, :], mask=nmask & (kw < P)[None, :], other=0).to(tl.uint32, bitcast=True)
        w1 = tl.load(row + kw[None, :] + 1, mask=nmask & (kw + 1 < P)[None, :], other=0)
        w2 = tl.load(row + kw[None, :] + 2, mask=nmask & (kw + 2 < P)[None, :], other=0)
        w1 = w1.to(tl.uint32, bitcast=True)
        w2 = w2.to(tl.uint32, bitcast=True)
        j = tl.arange(0, 32)
        bit = j * 3
        sh = (bit % 32).to(tl.uint32)[None, None, :]
        first = (bit // 32)[None, None, :]
        lo = tl.where(first == 0, w0[:, :, None], tl.where(first == 1, w1[:, :, None], w2[:, :, None]))
        hi = tl.where(first == 0, w1[:, :, None], w2[:, :, None])
        straddle = ((bit % 32) + 3 > 32)[None, None, :]
        q = (lo >> sh) | tl.where(straddle, hi << ((32 - sh) % 32), 0)
        q = (q & 7).to(tl.int32)
        return tl.reshape(q, (BLOCK_N, BLOCK_K))


@triton.jit
def _exact_float(q):
    """int32 q in [0, 2^23) -> float32 q exactly, by OR-ing in the exponent of 2^23 (no I2F instruction)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _mainloop(
    x_row, xmask, w_ptr, s_ptr, z_ptr, sm_ptr, rn, N, K, P, group_size, t_lo, t_hi,
    stride_xk, stride_wn, stride_sn, stride_sg,
    BITS: tl.constexpr, SYM: tl.constexpr, HAS_SMOOTH: tl.constexpr, INT8: tl.constexpr,
    PER_TILE_GROUP: tl.constexpr, SWAP_AB: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Σ over K tiles t_lo..t_hi of x[rows, k] · (q - z)[rn, k] · s[rn, g(k)] -> float32 `[BLOCK_M, BLOCK_N]`
    (`[BLOCK_N, BLOCK_M]` when SWAP_AB). `x_row` `[BLOCK_M, 1]` row pointers, `xmask` `[BLOCK_M]` valid rows."""
    nmask = rn < N
    OFF: tl.constexpr = 1 << (BITS - 1)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        k0 = t * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_row + rk[None, :] * stride_xk, mask=xmask[:, None] & kmask[None, :], other=0)
        q = _load_q(w_ptr, rn, k0, N, P, stride_wn, BITS, BLOCK_N, BLOCK_K)  # [BN, BK] int32
        if PER_TILE_GROUP:
            g = k0 // group_size
            s = tl.load(s_ptr + rn * stride_sn + g * stride_sg, mask=nmask, other=0.0).to(tl.float32)
            if SYM:
                z = tl.full((BLOCK_N,), OFF, tl.int32)
            else:
                z = tl.load(z_ptr + rn * stride_sn + g * stride_sg, mask=nmask, other=0).to(tl.int32)
            if INT8:
                wq = (q - OFF).to(tl.int8)
                if SWAP_AB:
                    part = tl.dot(wq, tl.trans(x), out_dtype=tl.int32)  # [BN, BM]
                    if not SYM:
                        xsum = tl.sum(x.to(tl.int32), axis=1)
                        part -= (z - OFF)[:, None] * xsum[None, :]
                    acc += part.to(tl.float32) * s[:, None]
                else:
                    part = tl.dot(x, tl.trans(wq), out_dtype=tl.int32)  # [BM, BN]
                    if not SYM:
                        xsum = tl.sum(x.to(tl.int32), axis=1)
                        part -= xsum[:, None] * (z - OFF)[None, :]
                    acc += part.to(tl.float32) * s[None, :]
            else:
                wf = _exact_float(q) - _exact_float(z)[:, None]  # q - z, exact
                if HAS_SMOOTH:
                    sm = tl.load(sm_ptr + rk, mask=kmask, other=1.0).to(tl.float32)
                    xd = (x.to(tl.float32) / sm[None, :]).to(x.dtype)
                else:
                    xd = x
                if DOT_IEEE:
                    if SWAP_AB:
                        acc += tl.dot(wf, tl.trans(xd.to(tl.float32)), input_precision="ieee") * s[:, None]
                    else:
                        acc += tl.dot(xd.to(tl.float32), tl.trans(wf), input_precision="ieee") * s[None, :]
                else:
                    if SWAP_AB:
                        acc += tl.dot(wf.to(x.dtype), tl.trans(xd)) * s[:, None]
                    else:
                        acc += tl.dot(xd, tl.trans(wf.to(x.dtype))) * s[None, :]
        else:
            # Per-element scales (group boundaries inside the tile): dequantize then dot.
            g2 = (rk // group_size)[None, :]
            sptr = rn[:, None] * stride_sn + g2 * stride_sg
            wmask = nmask[:, None] & kmask[None, :]
            s2 = tl.load(s_ptr + sptr, mask=wmask, other=0.0).to(tl.float32)
            if SYM:
                wf = (_exact_float(q) - OFF) * s2
            else:
                z2 = tl.load(z_ptr + sptr, mask=wmask, other=0).to(tl.int32)
                wf = (_exact_float(q) - _exact_float(z2)) * s2
            xf = x.to(tl.float32)
            if HAS_SMOOTH:
                sm = tl.load(sm_ptr + rk, mask=kmask, other=1.0).to(tl.float32)
                xf = xf / sm[None, :]
            if DOT_IEEE:
                if SWAP_AB:
                    acc += tl.dot(wf, tl.trans(xf), input_precision="ieee")
                else:
                    acc += tl.dot(xf, tl.trans(wf), input_precision="ieee")
            else:
                if SWAP_AB:
                    acc += tl.dot(wf.to(x.dtype), tl.trans(xf.to(x.dtype)))
                else:
                    acc += tl.dot(xf.to(x.dtype), tl.trans(wf.to(x.dtype)))
    return acc


@triton.jit
def _store_tile(y_ptr, acc, rm, rn, mmask, nmask, stride_ym, stride_yn, SWAP_AB: tl.constexpr,
                ATOMIC: tl.constexpr):
    """Write (or atomically add, split-K) the float32 tile `acc` to rows `rm` / columns `rn` of `y`."""
    if SWAP_AB:
        ptrs = y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None] * stride_yn
        omask = mmask[None, :] & nmask[:, None]
    else:
        ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn
        omask = mmask[:, None] & nmask[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=omask, sem="relaxed")
    else:
        tl.store(ptrs, acc, mask=omask)


@triton.jit
def _qe_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, sm_ptr, y_ptr,
    M, N, K, P, group_size, tiles_per_split,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_sg, stride_ym, stride_yn,
    BITS: tl.constexpr, SYM: tl.constexpr, HAS_SMOOTH: tl.constexpr, INT8: tl.constexpr,
    PER_TILE_GROUP: tl.constexpr, SWAP_AB: tl.constexpr, ATOMIC: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One `[BLOCK_M, BLOCK_N]` output tile over K tiles `[pid_k·tiles_per_split, ...)` (all of K without split).

    INT8: `x_ptr` holds int8 `x_q`, `xs_ptr` float32 per-token scales; otherwise `x_ptr` is the bf16/fp16/fp32
    input (`xs_ptr` unused)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    t_lo = pid_k * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(K, BLOCK_K))
    acc = _mainloop(x_ptr + rm[:, None].to(tl.int64) * stride_xm, mmask, w_ptr, s_ptr, z_ptr, sm_ptr, rn, N, K, P,
                    group_size, t_lo, t_hi, stride_xk, stride_wn, stride_sn, stride_sg, BITS, SYM, HAS_SMOOTH,
                    INT8, PER_TILE_GROUP, SWAP_AB, DOT_IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    if INT8:
        xs = tl.load(xs_ptr + rm, mask=mmask, other=0.0)
        if SWAP_AB:
            acc *= xs[None, :]
        else:
            acc *= xs[:, None]
    _store_tile(y_ptr, acc, rm, rn, mmask, rn < N, stride_ym, stride_yn, SWAP_AB, ATOMIC)


@triton.jit
def _quant_act_kernel(x_ptr, sm_ptr, amax_ptr, xq_ptr, xs_ptr, K, stride_xm, stride_qm,
                      HAS_SMOOTH: tl.constexpr, HAS_AMAX: tl.constexpr, ACT_BITS: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Per-token symmetric int8 quantization of `x / smooth` (one program per token): `xq[m, k]` int8 and
    `xs[m]` = max(amax / qmax, 1e-12) (amax = max |x/s| of the row, or the given `amax_ptr[m]`)."""
    m = tl.program_id(0)
    qmax: tl.constexpr = (1 << (ACT_BITS - 1)) - 1
    row = x_ptr + m.to(tl.int64) * stride_xm
    if HAS_AMAX:
        amax = tl.load(amax_ptr + m).to(tl.float32)
    else:
        vmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(row + rk, mask=rk < K, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                v = tl.math.div_rn(v, tl.load(sm_ptr + rk, mask=rk < K, other=1.0).to(tl.float32))
            vmax = tl.maximum(vmax, tl.abs(v))
        amax = tl.max(vmax, axis=0)
    scale = tl.maximum(tl.math.div_rn(amax, qmax * 1.0), 1e-12)
    tl.store(xs_ptr + m, scale)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(row + rk, mask=rk < K, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            v = tl.math.div_rn(v, tl.load(sm_ptr + rk, mask=rk < K, other=1.0).to(tl.float32))
        r = tl.clamp(_round_half_even(tl.math.div_rn(v, scale)), -qmax - 1.0, qmax * 1.0)
        tl.store(xq_ptr + m.to(tl.int64) * stride_qm + rk, r.to(tl.int8), mask=rk < K)


def quantize_activations(x: torch.Tensor, act_bits: int, smooth: torch.Tensor | None = None,
                         act_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `[M, K]` -> (int8 `[M, K]`, float32 per-token scales `[M]`); the twin of
    `fake_quantize_activation(x / smooth, act_bits, act_absmax)` = `xq * scale`."""
    if act_bits not in (4, 6, 8):
        raise ValueError(f"act_bits must be 4, 6 or 8, got {act_bits}")
    M, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    xq = torch.empty(M, K, device=x.device, dtype=torch.int8)
    xs = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:
        return xq, xs
    amax = act_absmax.reshape(-1).float().contiguous() if act_absmax is not None else xs
    launcher.launch(_quant_act_kernel, (M,), x, smooth if smooth is not None else xs, amax, xq, xs, K,
                    x.stride(0), xq.stride(0), HAS_SMOOTH=smooth is not None, HAS_AMAX=act_absmax is not None,
                    ACT_BITS=act_bits, BLOCK_K=min(1024, triton.next_power_of_2(max(K, 16))))
    return xq, xs


def kernel_layout(scale: torch.Tensor, zero: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales/zero points `[..., N, G]` as views whose N dimension is unit-stride (an N-major copy), so that the
    per-group scale loads of a tile are contiguous (vectorized). Call once at weight load; the kernels accept
    either layout (the checkpoint's `[N, G]` row-major one gives scalar scale loads)."""

    def nmajor(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    return nmajor(scale), None if zero is None else nmajor(zero)


def qe_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
            group_size: int, *, smooth: torch.Tensor | None = None, act_bits: int = 0,
            act_absmax: torch.Tensor | None = None, block: tuple[int, int, int] | None = None,
            split_k: int | None = None, swap_ab: bool | None = None, int8: bool = True) -> torch.Tensor:
    """`x` `[M, K]` · dequant(`packed` `[N, P]`)ᵀ -> float32 `[M, N]` (bias and adapters are added by the caller).

    `scale`/`zero` `[N, G]` in either memory layout (see `kernel_layout`). `act_absmax` `[M, 1]`: per-token max
    |x/s| (computed here when None). `block`: fixed (BM, BN, BK) instead of the launch table (the interpreter
    tests pin small blocks); `split_k`/`swap_ab`: override the table's choice; `int8=False` runs activation
    quantization through the float dot (x_q·s_x in float32) instead of the int8 MMA."""
    M, K = x.shape
    N, P = packed.shape
    if M == 0:
        return torch.zeros(0, N, device=x.device, dtype=torch.float32)
    tile = None
    if block is not None:
        bm, bn, bk = block
        tile = GemmTile(bm, bn, bk, 4, 2, bool(swap_ab))
    launch = plan(M, N, K, bits, group_size, act_bits, num_sms(x.device), tile, split_k)
    if swap_ab is not None and block is None:
        t = launch.tile
        launch = GemmLaunch(GemmTile(t.block_m, t.block_n, t.block_k, t.num_warps, t.num_stages, swap_ab),
                            launch.block_k, launch.per_tile_groups, launch.split_k, launch.int8)
    use_int8 = launch.int8 and int8
    gs = K if group_size == -1 else group_size
    xs = None
    x_in = x
    smooth_in = smooth
    if act_bits:
        xq, xs = quantize_activations(x, act_bits, smooth, act_absmax)
        smooth_in = None
        if use_int8:
            x_in = xq
        else:  # float path: the fake-quantized activations, in float32
            x_in = xq.float() * xs[:, None]
            xs = None
    y = (torch.zeros if launch.split_k > 1 else torch.empty)(M, N, device=x.device, dtype=torch.float32)
    k_tiles = triton.cdiv(K, launch.block_k)
    tps = triton.cdiv(k_tiles, launch.split_k)
    dummy = y
    t = launch.tile
    launcher.launch(
        _qe_gemm_kernel, launch.grid(M, N),
        x_in, xs if xs is not None else dummy, packed, scale, zero if zero is not None else scale,
        smooth_in if smooth_in is not None else dummy, y,
        M, N, K, P, gs, tps,
        x_in.stride(0), x_in.stride(1), packed.stride(0), scale.stride(0), scale.stride(1), y.stride(0),
        y.stride(1),
        BITS=bits, SYM=zero is None, HAS_SMOOTH=smooth_in is not None, INT8=use_int8 and act_bits > 0,
        PER_TILE_GROUP=launch.per_tile_groups, SWAP_AB=t.swap_ab, ATOMIC=launch.split_k > 1,
        DOT_IEEE=x_in.dtype == torch.float32, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=launch.block_k,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return y


def bytes_moved(M: int, N: int, K: int, bits: int, group_size: int, act_bits: int, sym: bool = False) -> int:
    """Minimum bytes one GEMM call must move: packed weights, fp16 scales (+u8 zero points), activations (bf16, or
    int8 after the quantization kernel), float32 output."""
    G = 1 if group_size == -1 else math.ceil(K / group_size)
    w = N * math.ceil(K * bits / 32) * 4
    sz = N * G * (2 if sym else 3)
    return w + sz + M * K * (1 if act_bits else 2) + M * N * 4
