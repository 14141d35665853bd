"""What the stored integers mean: weight and activation quantizers (pure tensor functions).

Conventions (docs/checkpoint-format.md):
- weights `[out, in]`, groups of `group_size` consecutive input channels (`-1` = one group per row); the last
  group may be shorter than `group_size` when `in` is not a multiple of it;
- asymmetric: `q = clamp(round(w / s) + z, 0, 2^b - 1)`, `s = (max - min) / (2^b - 1)` over a range that includes 0;
- symmetric: `z = 2^(b-1)` fixed (the integers `q - z` span `[-2^(b-1), 2^(b-1) - 1]`, vLLM's `uint4b8` for
  b = 4); the scale is `max|w| / (2^(b-1) - 1)` on the `restricted` grid (level `-2^(b-1)` unused) or
  `max|w| / (2^(b-1) - 1/2)` on the `full` grid, which uses all 2^b levels (compressed-tensors' choice);
- scales are rounded to float16 *before* the integers are chosen (what is stored is what was used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 8)
SUPPORTED_ACT_BITS = (4, 6, 8)
MIN_SCALE = 1e-6


@dataclass(frozen=True)
class WeightQuantParams:
    """Per-group quantization parameters: `scale` float32 `[out, G]` (float16-representable), `zero` float32
    `[out, G]` holding integers, `bits`, `group_size` (-1 = per-channel)."""

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool


def num_groups(in_features: int, group_size: int) -> int:
    """Number of quantization groups along the input dimension."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def group_index(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """`[in]` int64: the group of each input channel."""
    idx = torch.arange(in_features, device=device)
    return torch.zeros_like(idx) if group_size == -1 else idx // group_size


def _check(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_WEIGHT_BITS:
        raise ValueError(f"weight bits must be one of {SUPPORTED_WEIGHT_BITS}, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be positive or -1 (per-channel), got {group_size}")


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[out, in]` -> `[out, G, g]`, zero-padded so the last group is full (padding never widens a range that
    already includes 0)."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    pad = num_groups(in_f, group_size) * g - in_f
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_f, -1, g)


SYMMETRIC_GRIDS = ("restricted", "full")
DEFAULT_SYM_GRID = "full"  # all 2^b levels (measured: lower error than `restricted`, docs/algorithms.md)


def compute_qparams(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip_ratio: float | torch.Tensor = 1.0,
    sym_grid: str = DEFAULT_SYM_GRID,
) -> WeightQuantParams:
    """Min-max parameters for `w` `[out, in]`, the range shrunk by `clip_ratio` (a float, or `[out, G]` per group).

    `sym_grid` (symmetric only): `restricted` divides `max|w|` by `2^(b-1) - 1`; `full` by `2^(b-1) - 1/2`, so the
    most negative level is used and the largest magnitude rounds to the grid's end (module docstring)."""
    _check(bits, group_size)
    if sym_grid not in SYMMETRIC_GRIDS:
        raise ValueError(f"sym_grid must be one of {SYMMETRIC_GRIDS}, got {sym_grid!r}")
    wg = _grouped(w.float(), group_size)
    if symmetric:
        levels = 2 ** (bits - 1) - (1.0 if sym_grid == "restricted" else 0.5)
        scale = wg.abs().amax(dim=-1) * clip_ratio / levels
        scale = scale.clamp(min=MIN_SCALE).half().float()
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        maxq = 2**bits - 1
        wmax = wg.amax(dim=-1).clamp(min=0) * clip_ratio
        wmin = wg.amin(dim=-1).clamp(max=0) * clip_ratio
        scale = ((wmax - wmin) / maxq).clamp(min=MIN_SCALE).half().float()
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return WeightQuantParams(scale, zero, bits, group_size, symmetric)


def mse_clip_qparams(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, *, sym_grid: str = DEFAULT_SYM_GRID,
    max_shrink: float = 0.2, grid: int = 20, norm: float = 2.4, column_weight: torch.Tensor | None = None,
) -> WeightQuantParams:
    """Per-group clipping searched on the quantization error: the ratio in `1, 1 - max_shrink/grid, …,
    1 - max_shrink` minimising `Σ_c column_weight_c · |w - Q(w)|^norm` over each group is kept (ties: the larger
    ratio). `column_weight` `[in]` (e.g. the Hessian diagonal) defaults to ones. `norm` 2.4 is GPTQ's reference
    choice for its MSE grid. The search is exhaustive over the grid, so the result is never worse than min-max
    (ratio 1) under the searched loss."""
    wf = w.float()
    out_f, in_f = wf.shape
    cw = torch.ones(in_f) if column_weight is None else column_weight.float().clamp(min=0)
    best = compute_qparams(wf, bits, group_size, symmetric, 1.0, sym_grid)
    best_err = _group_error(wf, best, cw, norm)
    for i in range(1, grid + 1):
        ratio = 1.0 - max_shrink * i / grid
        qp = compute_qparams(wf, bits, group_size, symmetric, ratio, sym_grid)
        err = _group_error(wf, qp, cw, norm)
        better = err < best_err
        if bool(better.any()):
            best = WeightQuantParams(torch.where(better, qp.scale, best.scale), torch.where(better, qp.zero, best.zero),
                                     bits, group_size, symmetric)
            best_err = torch.where(better, err, best_err)
    return best


CLIPS = ("minmax", "mse")
DEFAULT_CLIP = "minmax"  # every weight quantizer's group ranges unless `--clip` says otherwise (docs/algorithms.md)


def choose_qparams(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: str = DEFAULT_CLIP, *,
    sym_grid: str = DEFAULT_SYM_GRID, column_weight: torch.Tensor | None = None,
) -> WeightQuantParams:
    """Group parameters of `w` `[out, in]`: min-max (`clip="minmax"`) or the per-group MSE-searched clipping
    (`clip="mse"`, `mse_clip_qparams`, weighted per input column by `column_weight` `[in]` when given)."""
    if clip == "minmax":
        return compute_qparams(w, bits, group_size, symmetric, sym_grid=sym_grid)
    if clip == "mse":
        return mse_clip_qparams(w, bits, group_size, symmetric, sym_grid=sym_grid, column_weight=column_weight)
    raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")


def _group_error(w: torch.Tensor, qp: WeightQuantParams, column_weight: torch.Tensor, norm: float) -> torch.Tensor:
    """`[out, G]` weighted `Σ |w - Q(w)|^norm` per group."""
    err = (fake_quantize_weight(w, qp) - w).abs().pow(norm) * column_weight[None, :]
    return _grouped(err, qp.group_size).sum(dim=-1)


def _expand(t: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """`[out, G]` -> `[out, in]` by repeating each group's value over its channels."""
    return t[:, group_index(in_features, group_size, t.device)]


def quantize(w: torch.Tensor, qp: WeightQuantParams) -> torch.Tensor:
    """Integers `[out, in]` (int32, in `[0, 2^bits)`) of `w` under `qp`."""
    in_f = w.shape[1]
    s = _expand(qp.scale, in_f, qp.group_size)
    z = _expand(qp.zero, in_f, qp.group_size)
    return torch.clamp(torch.round(w.float() / s) + z, 0, 2**qp.bits - 1).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 `[out, in]` weight from integers `q` `[out, in]`, `scale`/`zero` `[out, G]`."""
    in_f = q.shape[1]
    s = _expand(scale.float(), in_f, group_size)
    z = _expand(zero.float(), in_f, group_size)
    return (q.float() - z) * s


def fake_quantize_weight(w: torch.Tensor, qp: WeightQuantParams) -> torch.Tensor:
    """`dequantize(quantize(w))` in float32."""
    return dequantize(quantize(w, qp), qp.scale, qp.zero, qp.group_size)


def quantize_column(w_col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize one input column `[out]` with its group's `scale`/`zero` `[out]` (GPTQ's inner step)."""
    q = torch.clamp(torch.round(w_col / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def fake_quantize_activation(x: torch.Tensor, bits: int, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token dynamic symmetric fake quantization of `x` `[..., in]` in float32 arithmetic.

    `s_t = max|x_t| / (2^(b-1) - 1)`; `x_t ≈ clamp(round(x_t / s_t), -2^(b-1), 2^(b-1) - 1) * s_t`; returned in
    `x.dtype`. A zero row stays zero. `absmax` `[..., 1]` overrides `max|x_t|` (a tensor-parallel rank holding
    part of the token passes the max over all ranks, so every rank quantizes with the whole token's scale).
    """
    if bits not in SUPPORTED_ACT_BITS:
        raise ValueError(f"activation bits must be one of {SUPPORTED_ACT_BITS}, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if absmax is None else absmax.float()
    scale = (amax / qmax).clamp(min=1e-12)
    return (torch.clamp(torch.round(xf / scale), -qmax - 1, qmax) * scale).to(x.dtype)
