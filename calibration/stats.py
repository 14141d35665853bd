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
        if self.max_tokens:
            self._reservoir(x, vision)

    def _reservoir(self, x: torch.Tensor, vision: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(self.seed + self._seen)
        if self.sample is None:
            self.sample = x.new_empty(0, self.in_features)
            self.sample_vision = vision.new_empty(0)
        room = self.max_tokens - self.sample.shape[0]
        take = min(room, x.shape[0])
        if take:
            self.sample = torch.cat([self.sample, x[:take]])
            self.sample_vision = torch.cat([self.sample_vision, vision[:take]])
        for i in range(take, x.shape[0]):
            j = int(torch.randint(0, self._seen + i + 1, (1,), generator=gen))
            if j < self.max_tokens:
                self.sample[j] = x[i]
                self.sample_vision[j] = vision[i]
        self._seen += x.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        """`[in]` float32 mean |x| per channel."""
        return (self.abs_sum / max(self.n_tokens, 1)).float()

    def hessian(self) -> torch.Tensor:
        """`[in, in]` float64 `E[x xᵀ]` (token-weighted when weights were given)."""
        if self.xtx is None:
            raise ValueError("Gram statistics were not collected for this layer")
        return self.xtx / max(self.weight_sum, 1e-12)
