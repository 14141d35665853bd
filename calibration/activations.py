"""`ActivationStore`: the per-sample activations of the block being calibrated, in memory up to a budget and
spilled to safetensors files beyond it (read back one sample at a time), so that the calibration set's
activations never need to fit in memory at once."""

from __future__ import annotations

import shutil
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class ActivationStore:
    """A sequence of tensors (one per calibration sample). `budget_mib` None: all in memory; else samples past the
    budget go to files in `folder` (removed when the store is garbage-collected or `close`d)."""

    def __init__(self, folder: str | Path | None = None, budget_mib: float | None = None) -> None:
        self.budget = None if budget_mib is None else int(budget_mib * 2**20)
        self.folder = None if folder is None else Path(folder) / f"spill-{uuid.uuid4().hex[:8]}"
        self.items: list[torch.Tensor | Path] = []
        self.in_memory_bytes = 0
        if self.folder is not None:
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    @classmethod
    def of_files(cls, paths: list[Path]) -> ActivationStore:
        """A store whose samples are existing files (left in place)."""
        s = cls()
        s.items = list(paths)
        return s

    def append(self, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.budget is not None and self.folder is not None and self.in_memory_bytes + n > self.budget:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{len(self.items):06d}.safetensors"
            save_file({"t": t.detach().contiguous()}, str(path))
            self.items.append(path)
        else:
            self.items.append(t)
            self.in_memory_bytes += n

    @property
    def spilled(self) -> int:
        return sum(isinstance(i, Path) for i in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        return load_file(str(item))["t"] if isinstance(item, Path) else item

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self.items)):
            yield self[i]

    def close(self) -> None:
        self.items = []
        if self.folder is not None:
            self._finalizer()
