"""The one place the wrappers launch Triton kernels (tests swap it to trace the Python around the launches)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def launch(kernel: Any, grid: Sequence[int], *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`."""
    kernel[tuple(grid)](*args, **kwargs)
