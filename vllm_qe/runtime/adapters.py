"""Low-rank adapters of a QE linear layer as per-token LoRA: one shrink for all fused modules, one expand per module.

A layer fuses `n` checkpoint modules along its output (q/k/v, gate/up). The shared adapter is a plain LoRA:
`h = x·A_sᵀ` (`A_s` `[n·r, in]`, one GEMM), then module `g`'s output columns get `h_g·B_s[cols_g]ᵀ`. The routed
experts are LoRA with a per-token adapter index (the router's argmin per module), the work vLLM's punica ops do
(`bgmv_shrink` / `bgmv_expand_slice`). Two implementations, same math:

- `routed_masked` (default): shrink with every expert's A at once (`[T, n·E·r]`, one GEMM), zero the blocks of
  experts a token did not pick, expand with `[out_g, E·r]` per module. With E·r ≲ 64 this is a few thin GEMMs,
  no gather of weights per token, no host synchronisation (graph-safe, CUDA-graph-safe).
- `routed_punica`: vLLM's torch punica ops (`vllm.lora.ops.torch_ops`), which gather each token's `[r, in]` /
  `[out, r]` weights (T copies): measured slower on CPU (benchmarks/cpu_serving.py `--adapters-microbench`).

Weights are held in the activation dtype; the router stays float32 (`[n·E, in]`, tiny) so routing decisions
are made as the reference makes them.
"""

from __future__ import annotations

import torch


def routed_masked(x: torch.Tensor, a_all: torch.Tensor, b_g: torch.Tensor, ids_g: torch.Tensor,
                  num_experts: int, col0: int = 0) -> torch.Tensor:
    """Routed adapters of one module: `x` `[T, in]`, `a_all` `[E·r, in]` (this module's experts, stacked),
    `b_g` `[out_g, E·r]` (expert-major columns), `ids_g` `[T]` -> `[T, out_g]` in `x.dtype`."""
    h = x @ a_all.t()
    T = h.shape[0]
    pick = ids_g.unsqueeze(-1) == torch.arange(num_experts, device=x.device)  # [T, E]
    h = (h.view(T, num_experts, -1) * pick.unsqueeze(-1).to(h.dtype)).reshape(T, -1)
    return h @ b_g.t()


def routed_punica(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ids_g: torch.Tensor) -> torch.Tensor:
    """The same through vLLM's torch punica ops: `a` `[E, r, in]`, `b` `[E, out_g, r]`, `ids_g` `[T]`."""
    from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink

    T = x.shape[0]
    h = torch.zeros(T, a.shape[1], dtype=x.dtype, device=x.device)
    bgmv_shrink(x, a, h, ids_g, 1.0)
    y = torch.zeros(T, b.shape[1], dtype=x.dtype, device=x.device)
    bgmv_expand(h, b, y, ids_g, add_inputs=False)
    return y


def adapter_delta(x: torch.Tensor, out_splits: list[int], shared_a: torch.Tensor | None,
                  shared_b: torch.Tensor | None, routed_a: torch.Tensor | None, routed_b: torch.Tensor | None,
                  expert_ids: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """Sum of the shared and routed adapters of a layer `[T, out]` in `x.dtype`.

    `shared_a` `[n·r, in]`, `shared_b` `[out, r]`; `routed_a` `[n·E·r, in]` (module-major, then expert),
    `routed_b` `[out, E·r]`; `expert_ids` `[T, n]`."""
    n = len(out_splits)
    xa = x.to(shared_a.dtype if shared_a is not None else routed_a.dtype)
    hs = None if shared_a is None else xa @ shared_a.t()
    parts = []
    o0 = 0
    for g, width in enumerate(out_splits):
        part = None
        if hs is not None:
            r = hs.shape[1] // n
            part = hs[:, g * r:(g + 1) * r] @ shared_b[o0:o0 + width].t()
        if routed_a is not None:
            er = routed_a.shape[0] // n
            rp = routed_masked(xa, routed_a[g * er:(g + 1) * er], routed_b[o0:o0 + width], expert_ids[:, g],
                               num_experts)
            part = rp if part is None else part + rp
        parts.append(part)
        o0 += width
    return parts[0] if n == 1 else torch.cat(parts, dim=1)
