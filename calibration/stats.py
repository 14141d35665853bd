"""Streaming statistics of a linear layer's inputs, accumulated token batch by token batch.

Memory is bounded by the layer width (a Gram matrix is `in x in`), never by the number of calibration tokens;
the optional token reservoir keeps at most `max_tokens` rows (uniform reservoir sampling, seeded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InputStats:
    """Statistics of inputs `x` `[T, in]` with a vision mask `[T]` (True = vision token)."""

    in_features: int
    gram: bool = False
    max_tokens: int = 0
    seed: int = 0
    n_tokens: int = 0
    n_vision: int = 0
    abs_sum: torch.Tensor | None = None  # [in] float64, sum over tokens of |x|
    abs_max: torch.Tensor | None = None  # [in] float32
    xtx: torch.Tensor | None = None  # [in, in] float64, sum of x xᵀ (weighted when weights are given)
    weight_sum: float = 0.0
    sample: torch.Tensor | None = None  # [<= max_tokens, in] float32 reservoir
    sample_vision: torch.Tensor | None = None  # [<= max_tokens] bool
    sample_weight: torch.Tensor | None = None  # [<= max_tokens] float32 token weights (1 when none given)
    # QE channel statistics: per token the `topk` channels of largest |x_t| * channel_score are "important".
    topk: int = 0
    channel_score: torch.Tensor | None = None  # [in] (QE: mean_row |W|)
    pick_vision: torch.Tensor | None = None  # [in] float64 pick counts over vision tokens
    pick_text: torch.Tensor | None = None  # [in] float64 pick counts over text tokens
    cooc: torch.Tensor | None = None  # [in, in] float64 co-occurrence counts of important channels
    modality_ratio: float | None = None  # MBQ: g_vision / g_text of the block this layer sits in
    expert: object | None = None  # MoE: `moe.ExpertInfo` of the expert these inputs were routed to
    _seen: int = field(default=0, repr=False)

    def update(self, x: torch.Tensor, vision: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, self.in_features).float()
        vision = vision.reshape(-1).bool()
        if vision.numel() != x.shape[0]:
            raise ValueError(f"vision mask has {vision.numel()} entries for {x.shape[0]} tokens")
        ax = x.abs()
        self.abs_sum = ax.double().sum(0) if self.abs_sum is None else self.abs_sum + ax.double().sum(0)
        mx = ax.amax(0)
        self.abs_max = mx if self.abs_max is None else torch.maximum(self.abs_max, mx)
        self.n_tokens += x.shape[0]
        self.n_vision += int(vision.sum())
        if self.gram:
            xd = x.double()
            w = torch.ones(x.shape[0], dtype=torch.float64) if weight is None else weight.double().reshape(-1)
            g = (xd * w[:, None]).t() @ xd
            self.xtx = g if self.xtx is None else self.xtx + g
            self.weight_sum += float(w.sum())
        if self.topk:
            self._update_topk(ax, vision)
        if self.max_tokens:
            w = torch.ones(x.shape[0]) if weight is None else weight.float().reshape(-1)
            self._reservoir(x, vision, w)

    def _update_topk(self, ax: torch.Tensor, vision: torch.Tensor) -> None:
        k = min(self.topk, self.in_features)
        idx = (ax * self.channel_score).topk(k, dim=-1).indices
        onehot = torch.zeros_like(ax, dtype=torch.float64).scatter_(1, idx, 1.0)
        if self.cooc is None:
            self.cooc = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
            self.pick_vision = torch.zeros(self.in_features, dtype=torch.float64)
            self.pick_text = torch.zeros(self.in_features, dtype=torch.float64)
        self.cooc += onehot.t() @ onehot
        self.pick_vision += onehot[vision].sum(0)
        self.pick_text += onehot[~vision].sum(0)

    def _reservoir(self, x: torch.Tensor, vision: torch.Tensor, w: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(self.seed + self._seen)
        if self.sample is None:
            self.sample = x.new_empty(0, self.in_features)
            self.sample_vision = vision.new_empty(0)
            self.sample_weight = w.new_empty(0)
        room = self.max_tokens - self.sample.shape[0]
        take = min(room, x.shape[0])
        if take:
            self.sample = torch.cat([self.sample, x[:take]])
            self.sample_vision = torch.cat([self.sample_vision, vision[:take]])
            self.sample_weight = torch.cat([self.sample_weight, w[:take]])
        rest = x.shape[0] - take
        if rest > 0:
            # Algorithm R, vectorised: item i (global index n_i) replaces slot j ~ U[0, n_i] when j < max_tokens.
            n = torch.arange(self._seen + take, self._seen + x.shape[0]) + 1
            j = (torch.rand(rest, generator=gen) * n).long()
            keep = (j < self.max_tokens).nonzero(as_tuple=True)[0]
            for i in keep.tolist():  # sequential so later items overwrite earlier ones, as in Algorithm R
                self.sample[j[i]] = x[take + i]
                self.sample_vision[j[i]] = vision[take + i]
                self.sample_weight[j[i]] = w[take + i]
        self._seen += x.shape[0]

    def all_reduce(self) -> None:
        """Combine the statistics of all torch.distributed ranks (sums, max, and the token reservoirs concatenated
        in rank order then cut to `max_tokens`); a no-op without an initialised process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return

        def total(t: torch.Tensor | None, op=dist.ReduceOp.SUM, shape: tuple[int, ...] | None = None,
                  dtype=torch.float64) -> torch.Tensor | None:
            if t is None:  # this rank saw no tokens (an MoE expert): contribute zeros where others may not
                if shape is None:
                    return None
                t = torch.zeros(shape, dtype=dtype)
            t = t.clone()
            dist.all_reduce(t, op=op)
            return t

        counts = total(torch.tensor([self.n_tokens, self.n_vision, self.weight_sum], dtype=torch.float64))
        self.n_tokens, self.n_vision, self.weight_sum = int(counts[0]), int(counts[1]), float(counts[2])
        n = self.in_features
        self.abs_sum = total(self.abs_sum, shape=(n,))
        self.abs_max = total(self.abs_max, dist.ReduceOp.MAX, shape=(n,), dtype=torch.float32)
        self.xtx = total(self.xtx, shape=(n, n) if self.gram else None)
        self.cooc = total(self.cooc, shape=(n, n) if self.topk else None)
        self.pick_vision = total(self.pick_vision, shape=(n,) if self.topk else None)
        self.pick_text = total(self.pick_text, shape=(n,) if self.topk else None)
        if self.max_tokens:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.sample, self.sample_vision, self.sample_weight))
            parts = [p for p in parts if p[0] is not None]  # a rank no token reached (an MoE expert)
            if parts:
                self.sample = torch.cat([p[0] for p in parts])[: self.max_tokens]
                self.sample_vision = torch.cat([p[1] for p in parts])[: self.max_tokens]
                self.sample_weight = torch.cat([p[2] for p in parts])[: self.max_tokens]

    def ensure_channel_counts(self) -> None:
        """Zero top-k counts for a layer that saw no tokens (an MoE expert nobody was routed to)."""
        if self.cooc is None:
            self.cooc = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
            self.pick_vision = torch.zeros(self.in_features, dtype=torch.float64)
            self.pick_text = torch.zeros(self.in_features, dtype=torch.float64)

    @property
    def abs_mean(self) -> torch.Tensor:
        """`[in]` float32 mean |x| per channel."""
        return (self.abs_sum / max(self.n_tokens, 1)).float()

    def hessian(self) -> torch.Tensor:
        """`[in, in]` float64 `E[x xᵀ]` (token-weighted when weights were given). An MoE expert that no
        calibration token was routed to gets the identity (GPTQ then reduces to round-to-nearest)."""
        if self.xtx is None and self.gram and self.n_tokens == 0:
            return torch.eye(self.in_features, dtype=torch.float64)
        if self.xtx is None:
            raise ValueError("Gram statistics were not collected for this layer")
        return self.xtx / max(self.weight_sum, 1e-12)
