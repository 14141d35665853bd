"""Bootstrap confidence intervals over held-out questions (percentile method).

One pure function for every figure the evaluation reports: a mean over questions (accuracy), a paired difference
(pass the per-question difference of two methods on the same questions), or a ratio of sums (per-token KL and top-1
agreement: per-question numerators over per-question token counts). Questions are resampled with replacement.

`paired_ratio_interval` adds the second source of noise of a quantizer comparison: the calibration set. Two methods
calibrated on the same S calibration sets and scored on the same held-out questions are compared by the geometric
mean over sets of their per-set ratio; the interval resamples sets and questions (crossed: every checkpoint was
scored on the same questions, so one question draw serves every drawn set and both methods).
"""

from __future__ import annotations

import torch


def bootstrap_interval(num: torch.Tensor, den: torch.Tensor | None = None, *, resamples: int = 2000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `sum(num[i]) / sum(den[i])` (`den=None`: the mean of `num`).

    num, den: [n] per-question values (den > 0, e.g. answer tokens per question). Returns (low, high) at `level`;
    deterministic for a given `seed`.
    """
    num = torch.as_tensor(num, dtype=torch.float64).reshape(-1)
    n = num.numel()
    if n == 0:
        raise ValueError("bootstrap_interval: no values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_interval: level must be in (0, 1), got {level}")
    d = torch.ones_like(num) if den is None else torch.as_tensor(den, dtype=torch.float64).reshape(-1)
    if d.numel() != n:
        raise ValueError(f"bootstrap_interval: num has {n} values, den has {d.numel()}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    stats = num[idx].sum(1) / d[idx].sum(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(stats, q).tolist()
    return lo, hi


def paired_ratio_interval(num_a: torch.Tensor, num_b: torch.Tensor, *, resamples: int = 2000,
                          level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Geometric mean over calibration sets of `Σ num_a / Σ num_b` (e.g. KL of method A over method B), with a
    two-level percentile bootstrap interval: calibration sets and questions resampled with replacement, crossed
    (one question draw per replicate, shared by the drawn sets and both methods: paired).

    num_a, num_b: [S, n] per-set, per-question sums (e.g. KL summed over a question's tokens; the same n questions
    for both methods and every set, so token counts cancel in the ratio). Returns (estimate, low, high);
    deterministic for a given `seed`. With S = 1 the interval covers the questions only.
    """
    a = torch.as_tensor(num_a, dtype=torch.float64)
    b = torch.as_tensor(num_b, dtype=torch.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"paired_ratio_interval: num_a {tuple(a.shape)} and num_b {tuple(b.shape)} must be [S, n]")
    s_sets, n = a.shape
    if bool((b.sum(1) <= 0).any()):
        raise ValueError("paired_ratio_interval: method B has a zero total on some set")
    estimate = float(torch.log(a.sum(1) / b.sum(1)).mean().exp())
    g = torch.Generator().manual_seed(seed)
    sets = torch.randint(0, s_sets, (resamples, s_sets), generator=g)
    qs = torch.randint(0, n, (resamples, 1, n), generator=g)
    rows = sets[:, :, None]
    ratio = a[rows, qs].sum(-1) / b[rows, qs].sum(-1)  # [resamples, S]
    stats = torch.log(ratio).mean(-1).exp()
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(stats, q).tolist()
    return estimate, lo, hi
