"""Bit packing of `bits`-wide unsigned integers into int32 words along the last dimension.

Value `i` of a row goes into word `i // pf` at bit offset `(i % pf) * bits`, `pf = 32 // bits` (3-bit: 10 per
word, 2 spare bits). Rows are zero-padded to a whole number of words.
"""

from __future__ import annotations

import math

import torch


def pack_factor(bits: int) -> int:
    """Values per int32 word."""
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot pack {bits}-bit integers")
    return 32 // bits


def packed_width(in_features: int, bits: int) -> int:
    """Number of int32 words per row."""
    return math.ceil(in_features / pack_factor(bits))


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """`q` `[rows, in]` integers in `[0, 2^bits)` -> int32 `[rows, ceil(in / pf)]`."""
    if q.ndim != 2:
        raise ValueError(f"pack expects a 2-D tensor, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(q.min())}, {int(q.max())}]")
    pf = pack_factor(bits)
    rows, in_f = q.shape
    words = packed_width(in_f, bits)
    qi = torch.zeros(rows, words * pf, dtype=torch.int64, device=q.device)
    qi[:, :in_f] = q.to(torch.int64)
    shifts = torch.arange(pf, device=q.device, dtype=torch.int64) * bits
    packed = (qi.view(rows, words, pf) << shifts).sum(dim=-1)
    # Reinterpret the low 32 bits as a signed int32 word.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """int32 `[rows, words]` -> int32 `[rows, in_features]` in `[0, 2^bits)` (exact inverse of `pack`)."""
    pf = pack_factor(bits)
    if packed.shape[-1] != packed_width(in_features, bits):
        raise ValueError(
            f"packed width {packed.shape[-1]} does not hold {in_features} {bits}-bit values "
            f"(expected {packed_width(in_features, bits)} words)"
        )
    shifts = torch.arange(pf, device=packed.device, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return vals.reshape(*packed.shape[:-1], -1)[..., :in_features].to(torch.int32)
