"""Low-bit GEMM with in-kernel dequantization of the checkpoint's packed layout (no repacking).

`y[m, n] = Σ_k Q_act(x[m, k] / s_k) · (q[n, k] - z[n, g(k)]) · scale[n, g(k)]` with `q` read from the little-endian
bitstream of `weight_packed` (2/3/4/8 bits; 3-bit values may straddle two words), group scales/zero points
gathered per K element, optional smoothing division and per-token activation fake-quantization fused in.
Accumulation is float32; the dot runs in the input dtype (bf16/fp16 tensor cores) or IEEE fp32 for fp32 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _configs():
    return [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    ]


@triton.jit
def _round_half_even(v):
    """torch.round semantics (ties to even), portable across Triton versions and the interpreter."""
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _dequant_tile(w_ptr, s_ptr, z_ptr, rk, rn, K, N, stride_wn, stride_sn, stride_sg, group_size,
                  BITS: tl.constexpr, SYM: tl.constexpr):
    """[BLOCK_K, BLOCK_N] float32 dequantized weights for input channels rk and output channels rn."""
    mask = (rk < K)[:, None] & (rn < N)[None, :]
    off = rk * BITS
    word = off // 32
    shift = (off % 32).to(tl.uint32)
    w0 = tl.load(w_ptr + rn[None, :] * stride_wn + word[:, None], mask=mask, other=0).to(tl.uint32, bitcast=True)
    q = w0 >> shift[:, None]
    if (32 % BITS) != 0:
        straddle = (off % 32 + BITS) > 32
        w1 = tl.load(w_ptr + rn[None, :] * stride_wn + word[:, None] + 1, mask=mask & straddle[:, None],
                     other=0).to(tl.uint32, bitcast=True)
        q = q | tl.where(straddle[:, None], w1 << ((32 - shift) % 32)[:, None], 0)
    q = (q & ((1 << BITS) - 1)).to(tl.float32)
    g = rk // group_size
    s = tl.load(s_ptr + rn[None, :] * stride_sn + g[:, None] * stride_sg, mask=mask, other=0.0).to(tl.float32)
    if SYM:
        z = 2.0 ** (BITS - 1)
    else:
        z = tl.load(z_ptr + rn[None, :] * stride_sn + g[:, None] * stride_sg, mask=mask, other=0).to(tl.float32)
    return (q - z) * s


@triton.jit
def _qe_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, sm_ptr, amax_ptr, y_ptr,
    M, N, K, group_size, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_sg, stride_ym, stride_yn,
    BITS: tl.constexpr, SYM: tl.constexpr, HAS_SMOOTH: tl.constexpr, ACT_BITS: tl.constexpr,
    DOT_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if ACT_BITS > 0:
        qmax = 2.0 ** (ACT_BITS - 1) - 1.0
        amax = tl.load(amax_ptr + rm, mask=rm < M, other=1.0)
        xscale = tl.maximum(amax / qmax, 1e-12)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        xf = x.to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(sm_ptr + rk, mask=rk < K, other=1.0)
            xf = xf / sm[None, :]
        if ACT_BITS > 0:
            xf = tl.clamp(_round_half_even(xf / xscale[:, None]), -qmax - 1.0, qmax) * xscale[:, None]
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, rk, rn, K, N, stride_wn, stride_sn, stride_sg, group_size, BITS, SYM)
        if DOT_IEEE:
            acc += tl.dot(xf, w, input_precision="ieee")
        else:
            acc += tl.dot(xf.to(x.dtype), w.to(x.dtype))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc,
             mask=(rm < M)[:, None] & (rn < N)[None, :])


# CUDA: autotuned over decode/prefill tile shapes, keyed by the power-of-two bucket of M.
_qe_gemm_tuned = triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"])(_qe_gemm_kernel)


def qe_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
            group_size: int, *, smooth: torch.Tensor | None = None, act_bits: int = 0,
            act_absmax: torch.Tensor | None = None, block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`x` `[M, K]` · dequant(`packed` `[N, P]`)ᵀ -> float32 `[M, N]` (bias and adapters are added by the caller).

    `act_absmax` `[M, 1]`: per-token max |x/s| (computed here when None). `block`: fixed (BM, BN, BK) instead of
    the default heuristic (the interpreter tests pin small blocks)."""
    M, K = x.shape
    N = packed.shape[0]
    gs = K if group_size == -1 else group_size
    y = torch.empty(M, N, device=x.device, dtype=torch.float32)
    if act_bits and act_absmax is None:
        xs = x.float() if smooth is None else x.float() / smooth.float()
        act_absmax = xs.abs().amax(dim=-1, keepdim=True)
    amax = act_absmax.reshape(-1).float().contiguous() if act_bits else y  # dummy pointer when unused
    args = (x, packed, scale, zero if zero is not None else scale, smooth if smooth is not None else scale, amax, y,
            M, N, K, gs, triton.next_power_of_2(M),
            x.stride(0), x.stride(1), packed.stride(0), scale.stride(0), scale.stride(1), y.stride(0), y.stride(1))
    flags = dict(BITS=bits, SYM=zero is None, HAS_SMOOTH=smooth is not None, ACT_BITS=act_bits,
                 DOT_IEEE=x.dtype == torch.float32)
    if block is None and x.is_cuda:
        def grid(meta):
            return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])

        _qe_gemm_tuned[grid](*args, **flags)
    else:
        bm, bn, bk = block or (16, 32, 32)
        _qe_gemm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y
