"""Low-rank adapters of a QE linear layer as per-token LoRA: one shrink for everything, one expand per module.

A layer fuses `n` checkpoint modules along its output (q/k/v, gate/up). Module `g` has a shared adapter (plain
LoRA, `A_s` `[r, in]`, `B_s` `[out_g, r]`) and `E` routed experts (LoRA with a per-token adapter index, the
router's argmin for that module: the work vLLM's punica ops `bgmv_shrink` / `bgmv_expand_slice` do). Served form
(`pack_adapters`, built once at load): every module's shared and routed A rows stacked into one `[n·c, in]` matrix
(`c = r + E·r_e` rows per module, shared first) and each module's B columns side by side, `[out, c]`. A forward is
then one shrink GEMM `x·Aᵀ` for all modules and both kinds, a mask that zeroes the routed blocks of experts a token
did not pick, and one expand GEMM per module (`adapter_delta`): few thin GEMMs, no gather of weights per token, no
host synchronisation (graph-safe, CUDA-graph-safe). At one token (decode) every op is a fixed cost, so the number
of ops is what the adapters cost; the unpacked form (`adapter_delta_unpacked`: one shrink per kind and module, two
expands per module) ran ~2x the GEMM calls.

`routed_punica` is the same routed math through vLLM's torch punica ops (`vllm.lora.ops.torch_ops`), which gather
each token's `[r, in]` / `[out, r]` weights (T copies): measured slower on CPU (benchmarks/cpu_serving.py).

Weights are held in the activation dtype; the router stays float32 (`[n·E, in]`, tiny) so routing decisions
are made as the reference makes them.
"""

from __future__ import annotations

import torch


def pair(a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An adapter's (A, B) as one optional pair, as the MoE ops' references take them."""
    return None if a is None else (a, b)


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


def pack_adapters(out_splits: list[int], shared_a: torch.Tensor | None, shared_b: torch.Tensor | None,
                  routed_a: torch.Tensor | None, routed_b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Served form of a layer's adapters: `shared_a` `[n·r, in]`, `shared_b` `[out, r]`, `routed_a` `[n·E·r_e, in]`
    (module-major, then expert), `routed_b` `[out, E·r_e]` (either kind may be None) -> (`a` `[n·c, in]`: module
    `g`'s shared rows then its routed rows; `b` `[out, c]`: shared columns then routed columns), `c = r + E·r_e`."""
    n = len(out_splits)
    a_parts = [t.reshape(n, -1, t.shape[-1]) for t in (shared_a, routed_a) if t is not None]
    b_parts = [t for t in (shared_b, routed_b) if t is not None]
    a = torch.cat(a_parts, dim=1).reshape(-1, a_parts[0].shape[-1])
    return a.contiguous(), torch.cat(b_parts, dim=1).contiguous()


def adapter_delta(x: torch.Tensor, out_splits: list[int], a: torch.Tensor, b: torch.Tensor,
                  expert_ids: torch.Tensor | None, shared_rank: int, num_experts: int) -> torch.Tensor:
    """Sum of the shared and routed adapters of a layer `[T, out]` in `a.dtype`, from `pack_adapters`' form:
    `a` `[n·c, in]`, `b` `[out, c]`, `expert_ids` `[T, n]` (None without routed experts)."""
    n = len(out_splits)
    h = x.to(a.dtype) @ a.t()  # [T, n·c]
    T, c = h.shape[0], b.shape[1]
    if num_experts:
        hv = h.view(T, n, c)
        pick = (expert_ids.unsqueeze(-1) == torch.arange(num_experts, device=h.device)).to(h.dtype)  # [T, n, E]
        routed = (hv[:, :, shared_rank:].reshape(T, n, num_experts, -1) * pick.unsqueeze(-1)).reshape(T, n, -1)
        h = torch.cat([hv[:, :, :shared_rank], routed], dim=-1).reshape(T, n * c) if shared_rank else \
            routed.reshape(T, n * c)
    if n == 1:
        return h @ b.t()
    parts, o0 = [], 0
    for g, width in enumerate(out_splits):
        parts.append(h[:, g * c:(g + 1) * c] @ b[o0:o0 + width].t())
        o0 += width
    return torch.cat(parts, dim=1)


def adapter_delta_unpacked(x: torch.Tensor, out_splits: list[int], shared_a: torch.Tensor | None,
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


ROUTER_CHUNK_TOKENS = 256  # tokens per router GEMM: bounds the float32 |x| temporary (256 x in x 4 bytes)


@torch.library.custom_op("vllm_qe::router_scores", mutates_args=())
def router_scores(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """Router scores `|x|·Rᵀ` in float32 (`x` `[T, in]`, `router` `[n·E, in]` float32 -> `[T, n·E]`), as
    `kernels.reference.router_scores` computes them, in chunks of `ROUTER_CHUNK_TOKENS` tokens: at prefill the
    float32 copy of `|x|` of a whole batch (1024 tokens x 8960 inputs = 36 MiB) is a fresh allocation whose page
    faults cost ~100 ms per call on these machines; a chunk's is reused. One opaque op, so the token loop does not
    specialize vLLM's compiled graph."""
    T = x.shape[0]
    if T <= ROUTER_CHUNK_TOKENS:
        return x.float().abs() @ router.t()
    out = torch.empty(T, router.shape[0], dtype=torch.float32, device=x.device)
    for t0 in range(0, T, ROUTER_CHUNK_TOKENS):
        t1 = min(T, t0 + ROUTER_CHUNK_TOKENS)
        torch.mm(x[t0:t1].float().abs(), router.t(), out=out[t0:t1])
    return out


@router_scores.register_fake
def _(x, router):
    return x.new_empty(x.shape[0], router.shape[0], dtype=torch.float32)
