"""Bootstrap confidence intervals over held-out questions (percentile method).

One pure function for every figure the evaluation reports: a mean over questions (accuracy), a paired difference
(pass the per-question difference of two methods on the same questions), or a ratio of sums (per-token KL and top-1
agreement: per-question numerators over per-question token counts). Questions are resampled with replacement.
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
