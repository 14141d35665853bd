"""Reducers: what makes a calibration distributed. The layer loop and the block calibration are the same code for
one process and for `torchrun`; only the reducer differs.

- `Reducer` (one process): statistics are complete as collected, every input group is quantized here.
- `DistributedReducer` (torch.distributed, gloo on CPU / NCCL on GPUs): the calibration samples are sharded by
  rank, statistics and counts are all-reduced, input group `j` is quantized by rank `j % world` and the results
  are exchanged; rank 0 writes.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from vllm_qe.calibration.stats import InputStats


class Reducer:
    """A single process: rank 0 of 1."""

    rank: int = 0
    world: int = 1

    def shard(self, n: int) -> range:
        """The calibration sample indices of this rank."""
        return range(self.rank, n, self.world)

    def stats(self, st: InputStats) -> None:
        """Complete one layer's statistics over all ranks (in place)."""

    def sum_(self, t: torch.Tensor) -> None:
        """Sum a tensor of counts over all ranks (in place)."""

    def owns(self, j: int) -> bool:
        """Whether this rank quantizes input group `j`."""
        return j % self.world == self.rank

    def gather(self, mine: dict[str, Any]) -> dict[str, Any]:
        """Every rank's results merged (in rank order)."""
        return mine

    def barrier(self) -> None:
        """Wait for every rank."""


class DistributedReducer(Reducer):
    """torch.distributed's process group (already initialised)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def stats(self, st: InputStats) -> None:
        st.all_reduce()

    def sum_(self, t: torch.Tensor) -> None:
        self.dist.all_reduce(t)

    def gather(self, mine: dict[str, Any]) -> dict[str, Any]:
        parts: list = [None] * self.world
        self.dist.all_gather_object(parts, mine)
        merged: dict[str, Any] = {}
        for p in parts:
            merged.update(p)
        return merged

    def barrier(self) -> None:
        self.dist.barrier()


def init_reducer() -> Reducer:
    """Join the process group `torchrun` describes (`WORLD_SIZE` > 1), or one that is already initialised;
    otherwise the single-process reducer."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedReducer()
    return Reducer()
