"""Low-rank reconstructions of a quantization error `E = W - Ŵ` (`[out, in]`): `E ≈ B·A`, `B` `[out, r]`,
`A` `[r, in]`, so that `y += (x·Aᵀ)·Bᵀ`."""

from __future__ import annotations

import torch


def whitening(h: torch.Tensor, damp: float = 0.01, tries: int = 6) -> torch.Tensor:
    """`S` `[in, in]` lower-triangular with `S·Sᵀ = H + λI` (Cholesky of the activation Gram matrix).

    λ starts at `damp · mean(diag H)` and grows ×10 while H is not positive definite; if it never becomes so, the
    diagonal `sqrt(diag H)` is used (the LQER/ASER-style channel scale) — stated in the docs as the fallback."""
    h = h.double()
    mean_diag = float(h.diagonal().mean().clamp(min=1e-12))
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    lam = damp * mean_diag
    for _ in range(tries):
        s, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            return s
        lam *= 10
    return torch.diag(h.diagonal().clamp(min=1e-12).sqrt())


def whitened_svd(err: torch.Tensor, h: torch.Tensor, rank: int, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` `B·A` minimising `E_x ||(E - B·A)·x||²` for `E[x xᵀ] = h` (SVD-LLM / ASER form):
    `S = chol(H)`, `U Σ Vᵀ = SVD(E·S)`, `B = U_r Σ_r`, `A = V_rᵀ S⁻¹`. Returns (`A` `[r, in]`, `B` `[out, r]`)."""
    rank = min(rank, *err.shape)
    s = whitening(h, damp)
    u, sig, vh = torch.linalg.svd(err.double() @ s, full_matrices=False)
    b = u[:, :rank] * sig[:rank]
    # A = V_rᵀ S⁻¹  <=>  Sᵀ Aᵀ = V_r  (triangular solve, no explicit inverse)
    a = torch.linalg.solve_triangular(s.t(), vh[:rank].t(), upper=True).t()
    return a.float(), b.float()


def scaled_svd(err: torch.Tensor, scale: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LQER: SVD of `E·diag(s)` with a per-channel activation scale `s` `[in]`; `A = V_rᵀ diag(s)⁻¹`."""
    rank = min(rank, *err.shape)
    s = scale.double().clamp(min=1e-8)
    u, sig, vh = torch.linalg.svd(err.double() * s, full_matrices=False)
    return (vh[:rank] / s).float(), (u[:, :rank] * sig[:rank]).float()


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad `A` `[r, in]` / `B` `[out, r]` to exactly `rank` (the format fixes ranks per checkpoint)."""
    r = a.shape[0]
    if r == rank:
        return a, b
    return (torch.cat([a, a.new_zeros(rank - r, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1))
