"""QE — Quant Experts: a shared low-rank expert for token-independent important channels and routed low-rank
experts for token-dependent ones, chosen per token by a linear router on |x| (arXiv 2602.24059).

Pure functions on tensors; the evidence tags ([S] secondary notes, [I] our inference) follow
`shared/papers/algorithms.md` and are repeated in docs/algorithms.md with the measured alternatives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from vllm_qe.calibration.algorithms.base import Algorithm, LinearTarget, StatsRequest, register
from vllm_qe.calibration.algorithms.budget import ranks_for_budget, smoothing_bpw
from vllm_qe.calibration.algorithms.compose import BASES, Recipe, choose_recipe, smoothing_scales
from vllm_qe.calibration.algorithms.gptq import GPTQConfig, gptq_quantize
from vllm_qe.calibration.algorithms.lowrank import pad_rank, whitened_svd
from vllm_qe.calibration.stats import InputStats
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.quantizer import DEFAULT_CLIP, choose_qparams, dequantize, quantize
from vllm_qe.format.spec import AdapterScheme, ModuleScheme, WeightScheme, parse_expert_name


@dataclass
class QEParams:
    """QE's parameters; [S] / [I] tags as in docs/algorithms.md."""

    k: int = 32  # important channels per token [S]
    num_routed: int = 8  # N_r [S]
    shared_rank: int = 32  # r_s [S]
    routed_rank: int = 32  # r_r [S]
    # the base under the experts (compose.BASES); auto = per input group the lowest measured output error
    # (activation quantization included) of GPTQ, SmoothQuant + GPTQ and SmoothQuant + RTN (`recipe`)
    base: Literal["auto", "rtn", "gptq", "veq", "smoothquant", "awq"] = "auto"
    alpha: float = 0.5  # SmoothQuant migration strength
    damp: float = 0.01  # the GPTQ base's damping (`GPTQConfig.damp`: fraction of mean(diag H))
    # C_s columns exempt from direct quantization [S]; off by default: measured worse at equal bytes (the base
    # loses those columns and a small adapter cannot give them back; issue 11, docs/algorithms.md)
    exempt_shared: bool = False
    mix: float = 0.1  # weight of the global Gram matrix in each routed expert's fit (regulariser) [I]
    refine_steps: int = 0  # optional AdamW refinement of routed experts + router (0 = off) [S]
    refine_lr: float = 1e-4
    refine_seconds: float = 30.0  # wall-clock bound per layer
    seed: int = 0
    # >= 0: ranks from this budget in bits per weight per layer group (budget.py); < 0: the explicit ranks above
    # (given `shared_rank` / `routed_rank` without `adapter_bpw` select them: `QuantExperts.parse_params`)
    adapter_bpw: float = 0.25
    routed_share: float = 0.5  # with adapter_bpw: the budget's share spent on routed experts (+ router)
    guard_adapters: bool = True  # keep an adapter only where it lowers the layer's calibration loss
    expert_rank: int = 8  # MoE experts: one shared low-rank expert of this rank per expert projection [I]
    gamma: float = 1.0  # only read by the calibration API when no gradient pass gives γ


def channel_split(stats: InputStats, k: int, num_routed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_s, C_r): the `k` most frequently important channels, then the next `num_routed * k` [S]."""
    freq = stats.pick_vision + stats.pick_text
    order = torch.argsort(freq, descending=True, stable=True)
    return order[:k], order[k:k + num_routed * k]


def npmi_affinity(cooc: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """NPMI of channel co-occurrence, mapped to a [0, 1] affinity `(npmi + 1) / 2` [S: NPMI; I: the mapping,
    since spectral clustering needs non-negative affinities]. Pairs never seen together get NPMI = -1."""
    p = cooc.double() / max(n_tokens, 1)
    pi = p.diagonal()
    pij = p
    npmi = torch.log(pij / (pi[:, None] * pi[None, :]).clamp(min=1e-300)) / (-torch.log(pij))
    npmi = torch.where(pij > 0, npmi, torch.full_like(npmi, -1.0))
    npmi = torch.where(pij >= 1.0, torch.ones_like(npmi), npmi)  # always co-occurring: -log p = 0
    npmi.fill_diagonal_(1.0)
    # A small floor keeps the affinity graph connected (spectral clustering warns and degrades otherwise) [I].
    return ((npmi.clamp(-1, 1) + 1) / 2).clamp(min=1e-3).float()


def cluster_channels(affinity: torch.Tensor, n_clusters: int, seed: int = 0) -> np.ndarray:
    """scikit-learn spectral clustering on a precomputed affinity (normalised Laplacian + k-means) [S]."""
    from sklearn.cluster import SpectralClustering

    n = affinity.shape[0]
    if n_clusters >= n:
        return np.arange(n) % n_clusters
    sc = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=seed, assign_labels="kmeans")
    labels = sc.fit_predict(affinity.double().numpy())
    # Canonical order (clusters numbered by their first member): the same partition always gives the same
    # expert numbering, whatever k-means' label permutation.
    first: dict[int, int] = {}
    for lab in labels.tolist():
        first.setdefault(lab, len(first))
    return np.array([first[lab] for lab in labels.tolist()])


def token_groups(x: torch.Tensor, channel_score: torch.Tensor, k: int, channels: torch.Tensor,
                 labels: np.ndarray, n_groups: int) -> torch.Tensor:
    """Each token's group: the cluster holding most of its important channels (-1: none of them) [I]."""
    idx = (x.abs() * channel_score).topk(min(k, x.shape[1]), dim=-1).indices
    lab = torch.full((x.shape[1],), -1, dtype=torch.long)
    lab[channels] = torch.as_tensor(labels, dtype=torch.long)
    hits = lab[idx]  # [T, k]
    counts = torch.stack([(hits == g).sum(1) for g in range(n_groups)], 1)  # [T, G]
    best = counts.argmax(1)
    return torch.where(counts.max(1).values > 0, best, torch.full_like(best, -1))


def base_quantize(w: torch.Tensor, scheme: WeightScheme, exempt: torch.Tensor | None, hessian: torch.Tensor | None,
                  method: str, gptq: GPTQConfig | None = None, clip: str = DEFAULT_CLIP) -> QuantizedLinear:
    """RTN or GPTQ (with `gptq`'s options) of `w` with `exempt` columns forced to dequantize to 0 (they are left
    to the adapters); group ranges by `clip`."""
    if method == "gptq":
        return gptq_quantize(w, hessian, scheme, exempt=exempt, clip=clip, **asdict(gptq or GPTQConfig()))
    wz = w.clone()
    if exempt is not None:
        wz[:, exempt] = 0.0
    qp = choose_qparams(wz, scheme.bits, scheme.group_size, scheme.symmetric, clip)
    return QuantizedLinear(quantize(wz, qp), qp.scale, qp.zero, scheme.bits, scheme.group_size, scheme.symmetric)


def calibration_loss(err: torch.Tensor, h: torch.Tensor) -> float:
    """`tr(E H Eᵀ)` = `E_x ‖E x‖²` for `E` `[out, in]` and `H = E[x xᵀ]` `[in, in]` (float64 accumulation)."""
    e = err.double()
    return float(((e @ h.double()) * e).sum())


def routed_loss(resid: torch.Tensor, x: torch.Tensor, tw: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                router: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Token-weighted `Σ_t w_t ‖(E_S − B_e A_e) x_t‖²` with `e` = the router's pick per token, and each expert's
    share `[E]` of it minus what its tokens cost without it (< 0: the expert helps). `x` `[T, in]`, `tw` `[T]`,
    `a` `[E, r, in]`, `b` `[E, out, r]`, `router` `[E, in]`."""
    pick = route_tokens(x, router)
    base = x @ resid.t()  # [T, out]
    corr = torch.einsum("tr,tor->to", torch.einsum("ti,tri->tr", x, a[pick]), b[pick])
    with_e = (base - corr).pow(2).sum(-1) * tw
    without = base.pow(2).sum(-1) * tw
    gain = torch.zeros(a.shape[0], dtype=torch.float64).index_add_(0, pick, (with_e - without).double())
    return float(with_e.double().sum()), gain


def route_tokens(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """`[T]` the expert each token takes: `argmin_e (R |x|)_e` (ties → lowest id), as the runtime does."""
    return (x.abs() @ router.t()).argmin(-1)


def qe_fit(weight: torch.Tensor, stats: InputStats, scheme: ModuleScheme, p: QEParams,
           smooth: torch.Tensor | None, base: str, token_weight: torch.Tensor | None = None,
           gptq: GPTQConfig | None = None, ranks: AdapterScheme | None = None,
           clip: str = DEFAULT_CLIP) -> QuantizedLinear:
    """Quantize one linear layer and fit its shared expert, routed experts and router.

    `weight` `[out, in]`; `stats` with Gram, reservoir and top-k co-occurrence; `smooth` `[in]` or None.
    `ranks`: the module's adapters (the algorithm passes `scheme.adapters`, what the checkpoint declares); None
    takes them from `p`. With `p.guard_adapters` an
    adapter is kept only where it lowers the layer's calibration loss: the shared expert under `tr(E H Eᵀ)`, each
    routed expert on the tokens the router sends it (a dropped expert is zeroed and its router row recomputed),
    so base + adapters is never worse than the base alone on the calibration data.
    Returns a QuantizedLinear whose adapters are zero-padded to the module's ranks."""
    w = weight.float()
    out_f, in_f = w.shape
    if ranks is None:
        ranks = AdapterScheme(p.shared_rank, p.num_routed, p.routed_rank if p.num_routed else 0)
    stats.ensure_channel_counts()
    k = max(1, min(p.k, in_f // 8))
    cs, cr = channel_split(stats, k, ranks.num_routed)
    exempt = None
    if p.exempt_shared:
        exempt = torch.zeros(in_f, dtype=torch.bool)
        exempt[cs] = True
    ws = w if smooth is None else w * smooth
    h64 = stats.hessian()  # float64: the base gets GPTQ's own Hessian (QE over a GPTQ base = that GPTQ + adapters)
    h = h64.float()
    hs = h64 if smooth is None else h64 / torch.outer(smooth.double(), smooth.double())
    q = base_quantize(ws, scheme.weight, exempt, hs, base, gptq, clip)
    q.smooth = smooth
    w_hat = dequantize(q.qweight, q.scale, q.zero, q.group_size)
    if smooth is not None:
        w_hat = w_hat / smooth
    err = w - w_hat  # what the adapters (reading the unsmoothed x) must add back

    resid = err
    if ranks.shared_rank:
        a_s, b_s = whitened_svd(err, h, ranks.shared_rank)  # [S] shared expert: whitening SVD
        if p.guard_adapters and calibration_loss(err - b_s @ a_s, h) >= calibration_loss(err, h):
            a_s, b_s = a_s.new_zeros(0, in_f), b_s.new_zeros(out_f, 0)
        q.shared_a, q.shared_b = pad_rank(a_s, b_s, ranks.shared_rank)
        resid = err - b_s @ a_s

    if ranks.num_routed:
        n_routed, r_r = ranks.num_routed, ranks.routed_rank
        n_groups = min(n_routed, max(1, len(cr)))
        e_ra = torch.zeros(n_routed, r_r, in_f)
        e_rb = torch.zeros(n_routed, out_f, r_r)
        router = torch.zeros(n_routed, in_f)
        labels = cluster_channels(npmi_affinity(stats.cooc[cr][:, cr], stats.n_tokens), n_groups, p.seed)
        x = stats.sample
        tw = torch.ones(x.shape[0]) if token_weight is None else token_weight.float()
        groups = token_groups(x, stats.channel_score, k, cr, labels, n_groups)
        for g in range(n_routed):
            if g < n_groups:
                sel = groups == g
                hg = p.mix * h
                if float(tw[sel].sum()) > 0:  # (TLQ can give a whole group zero weight)
                    xg = x[sel] * tw[sel].sqrt()[:, None]
                    hg = hg + (xg.t() @ xg) / float(tw[sel].sum())
                a, b = whitened_svd(resid, hg, r_r)
                a, b = pad_rank(a, b, r_r)
                e_ra[g], e_rb[g] = a, b
            # [S]/[I] closed-form router: an upper bound of the expert's residual, linear in |x|.
            router[g] = (resid - e_rb[g] @ e_ra[g]).norm(dim=0)
        if p.refine_steps:
            e_ra, e_rb, router = refine_routed(resid, x, tw, e_ra, e_rb, router, p)
        if p.guard_adapters:
            e_ra, e_rb, router = drop_harmful_experts(resid, x, tw, e_ra, e_rb, router)
        q.routed_a, q.routed_b, q.router = e_ra, e_rb, router
    return q


def drop_harmful_experts(resid: torch.Tensor, x: torch.Tensor, tw: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         router: torch.Tensor, rounds: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero the routed experts that raise the loss on the tokens routed to them (and recompute their router rows
    as the uncorrected residual's column norms), until none does; if routing still loses overall, all experts are
    zeroed (the layer then computes exactly the base + shared expert)."""
    a, b, router = a.clone(), b.clone(), router.clone()
    no_fix = resid.norm(dim=0)
    for _ in range(rounds):
        _, gain = routed_loss(resid, x, tw, a, b, router)
        bad = gain > 0
        if not bool(bad.any()):
            break
        a[bad], b[bad] = 0.0, 0.0
        router[bad] = no_fix
    total, _ = routed_loss(resid, x, tw, a, b, router)
    if total > float((x @ resid.t()).pow(2).sum(-1).mul(tw).double().sum()):
        a.zero_(), b.zero_()
        router[:] = no_fix
    return a, b, router


def refine_routed(resid: torch.Tensor, x: torch.Tensor, tw: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  router: torch.Tensor, p: QEParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optional refinement [S]: AdamW (cosine schedule) on the routed experts and the router, layer-local.

    Loss = regression `E_t ‖(E_S − B_e A_e) x_t‖²` for the expert the (hard) router picks + a KL term pulling the
    router's soft scores `softmax(−R|x|/τ)` towards `softmax(−err/τ)` of the experts' actual errors [I: τ = the
    scores' std]. Bounded by `refine_steps` and `refine_seconds`; the closed-form start is kept if refinement
    does not lower the routed regression loss on the layer's tokens."""
    import time

    g = torch.Generator().manual_seed(p.seed)
    a, b, r = (t.clone().requires_grad_(True) for t in (a, b, router))
    opt = torch.optim.AdamW([a, b, r], lr=p.refine_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.refine_steps)
    w = tw / tw.mean()

    def expert_errors(xb: torch.Tensor) -> torch.Tensor:  # [T, E] squared residual after each expert
        base = xb @ resid.t()  # [T, out]
        corr = torch.einsum("ti,eri,eor->teo", xb, a, b)
        return (base[:, None, :] - corr).pow(2).sum(-1)

    def routed_loss(xb, wb) -> torch.Tensor:
        err = expert_errors(xb)
        pick = (xb.abs() @ r.t()).argmin(-1)
        return (err.gather(1, pick[:, None])[:, 0] * wb).mean()

    with torch.no_grad():
        start = float(routed_loss(x, w))
        best = (start, a.detach().clone(), b.detach().clone(), r.detach().clone())
    t0 = time.perf_counter()
    for _ in range(p.refine_steps):
        idx = torch.randint(0, x.shape[0], (min(256, x.shape[0]),), generator=g)
        xb, wb = x[idx], w[idx]
        err = expert_errors(xb)
        scores = xb.abs() @ r.t()
        pick = scores.argmin(-1)
        reg = (err.gather(1, pick[:, None])[:, 0] * wb).mean()
        tau_t = err.detach().std().clamp(min=1e-12)
        tau_s = scores.detach().std().clamp(min=1e-12)
        kl = torch.nn.functional.kl_div(torch.log_softmax(-scores / tau_s, -1), torch.softmax(-err.detach() / tau_t, -1),
                                        reduction="batchmean")
        loss = reg + reg.detach() * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            r.clamp_(min=0)  # scores stay an error estimate (non-negative)
        if time.perf_counter() - t0 > p.refine_seconds:
            break
    with torch.no_grad():
        end = float(routed_loss(x, w))
        if end < best[0]:
            best = (end, a.detach().clone(), b.detach().clone(), r.detach().clone())
    return best[1], best[2], best[3]


def _used_rank(*factors: tuple[torch.Tensor | None, int]) -> int:
    """The smallest rank `r` such that every rank index `>= r` is zero in all `(tensor, rank dim)` pairs."""
    used = 0
    for t, dim in factors:
        if t is None:
            continue
        nz = (t != 0).transpose(dim, 0).reshape(t.shape[dim], -1).any(1).nonzero()
        used = max(used, int(nz[-1]) + 1 if len(nz) else 0)
    return used


def trim_group_adapters(group: dict[str, QuantizedLinear]) -> dict[str, QuantizedLinear]:
    """The input group's adapters cut to the ranks any member uses (the guard zeroes what does not help,
    `pad_rank` pads short fits): the shared rank and the routed rank are each the largest used over the group
    (members vLLM fuses share one scheme); routed experts (and router) are dropped when none is used. The layer
    computes exactly the same; the checkpoint stores only adapters that lower the calibration loss."""
    qs = list(group.values())
    r_s = _used_rank(*((q.shared_a, 0) for q in qs), *((q.shared_b, 1) for q in qs))
    r_r = _used_rank(*((q.routed_a, 1) for q in qs), *((q.routed_b, 2) for q in qs))
    for q in qs:
        if q.shared_a is not None:
            q.shared_a, q.shared_b = (q.shared_a[:r_s], q.shared_b[:, :r_s]) if r_s else (None, None)
        if q.routed_a is not None:
            q.routed_a, q.routed_b = (q.routed_a[:, :r_r], q.routed_b[:, :, :r_r]) if r_r else (None, None)
            if not r_r:
                q.router = None
    return group


@register
class QuantExperts(Algorithm):
    """QE. Parameters (`QEParams`, JSON via --method-params). Defaults are the paper's (32, 8, 32, 32); k is capped
    at in/8 for narrow layers. `base` composes a smoothing and a quantizer (`compose.BASES`) under the experts."""

    name = "qe"
    Config = QEParams

    @property
    def p(self) -> QEParams:
        return self.config

    @property
    def adapters(self) -> AdapterScheme:
        """The checkpoint's default adapters: the explicit ranks, or none under a byte budget (every layer group
        then gets its own ranks as an override, `adapters_for`)."""
        if self.p.adapter_bpw >= 0:
            return AdapterScheme()
        return AdapterScheme(self.p.shared_rank, self.p.num_routed, self.p.routed_rank if self.p.num_routed else 0)

    @classmethod
    def parse_params(cls, params: dict | None) -> QEParams:
        """As `Algorithm.parse_params`; explicit ranks (`shared_rank` / `routed_rank`) without an `adapter_bpw`
        mean those ranks, not the default byte budget."""
        params = dict(params or {})
        if ("shared_rank" in params or "routed_rank" in params) and "adapter_bpw" not in params:
            params["adapter_bpw"] = -1.0
        return super().parse_params(params)

    def adapters_for(self, in_features: int, out_features: list[int], smoothed: bool | None = None) -> AdapterScheme:
        """With `adapter_bpw >= 0` the largest ranks within that budget on this layer group (`budget.py`), less
        the group's smoothing vectors when it stores them (`smoothed`; None: when the checkpoint may, the plan's
        bound), so base + everything QE adds stays within the budget; otherwise the explicit ranks."""
        if self.p.adapter_bpw < 0:
            return self.adapters
        budget = self.p.adapter_bpw
        if self.uses_smoothing(True) if smoothed is None else smoothed:
            budget = max(0.0, budget - smoothing_bpw(in_features, out_features))
        return ranks_for_budget(in_features, out_features, budget, num_routed=self.p.num_routed,
                                routed_share=self.p.routed_share)

    @property
    def expert_adapters(self) -> AdapterScheme:
        return AdapterScheme(self.p.expert_rank)

    @property
    def needs_gradients(self) -> bool:
        return self.p.base == "veq"  # γ of the affinity Hessian

    def uses_smoothing(self, act_quantized: bool) -> bool:
        return self.p.base in ("smoothquant", "awq", "auto")  # auto: a group may choose a smoothed base

    def stats_request(self, scheme: ModuleScheme) -> StatsRequest:
        return StatsRequest(gram=True, max_tokens=4096, topk=self.p.k, affinity=self.p.base == "veq")

    def recipe(self, targets: list[LinearTarget]) -> Recipe:
        """The base under the experts. `auto`: the candidate (GPTQ, SmoothQuant + GPTQ, SmoothQuant + RTN) with the
        lowest measured base output error on this group's tokens, activation quantization included when the scheme
        has it (`compose.choose_recipe`), so QE is the best of those bases plus adapters that never raise a layer's
        loss. Measured (docs/algorithms.md): SmoothQuant's migration cost 25-100x KL on the outlier-free peer
        fixtures and is what saves the columns that read outlier channels on the outlier fixture, weight-only
        too. `veq` is GPTQ on the experts' affinity-weighted Hessian (plain GPTQ elsewhere)."""
        act = targets[0].scheme.activation
        gptq = GPTQConfig(damp=self.p.damp)
        if self.p.base != "auto":
            return Recipe(*BASES[self.p.base], alpha=self.p.alpha, gptq=gptq, clip=self.clip)
        candidates = [Recipe(sm, qz, alpha=self.p.alpha, gptq=gptq, clip=self.clip)
                      for sm, qz in (("none", "gptq"), ("smoothquant", "gptq"), ("smoothquant", "rtn"))]
        return choose_recipe(candidates, targets, act.bits if act else None, targets[0].stats.sample_weight)[0]

    def quantize_group(self, targets: list[LinearTarget]) -> dict[str, QuantizedLinear]:
        """One input group: its base (`recipe`), then each member's adapters. A group of dense layers stores only
        what it uses: a smoothing vector when its base smooths, adapter ranks from the budget left after it,
        trimmed to the ranks the guard kept (`trim_group_adapters`). MoE experts keep their declared scheme
        (vLLM's fused-MoE layer holds one scheme for all experts): an identity vector where smoothing is declared."""
        recipe = self.recipe(targets)
        s = smoothing_scales(recipe, targets, token_weight=targets[0].stats.sample_weight)
        experts = parse_expert_name(targets[0].name) is not None
        if experts and s is None and self.uses_smoothing(targets[0].scheme.activation is not None):
            s = torch.ones(targets[0].weight.shape[1])
        ranks = None if experts else self.adapters_for(targets[0].weight.shape[1],
                                                       [t.weight.shape[0] for t in targets], smoothed=s is not None)
        out = {}
        for t in targets:
            # ranks from the module's scheme: MoE experts get one shared expert of `expert_rank` (their override)
            out[t.name] = qe_fit(t.weight, t.stats, t.scheme, self.p, s, recipe.quantizer, t.stats.sample_weight,
                                 recipe.gptq, t.scheme.adapters if experts else ranks, recipe.clip)
        return out if experts else trim_group_adapters(out)
