"""Bit packing of `bits`-wide unsigned integers into int32 words along the last dimension.

Each row is a little-endian bitstream: value `i` occupies bits `[i*bits, (i+1)*bits)`, bit `j` of the stream is
bit `j % 32` of word `j // 32`. For 2/4/8 bits this is "value `i` in word `i // (32/bits)` at offset
`(i % (32/bits)) * bits`"; 3-bit values pack 32 to 3 words (a value may straddle two words), so a row slice
of a multiple of 32 values is a whole number of words (tensor-parallel sharding along the input dimension).
Rows are zero-padded to a whole number of words.
"""

from __future__ import annotations

import math

import torch

_CHUNK_BITS = 1 << 22  # bits per step: bounds the temporary int64 bit tensors (~32 MiB each)


def _row_chunk(bits_per_row: int) -> int:
    return max(1, _CHUNK_BITS // max(bits_per_row, 1))


def pack_factor(bits: int) -> float:
    """Values per int32 word (10.67 for 3-bit)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot pack {bits}-bit integers")
    return 32 / bits


def shard_unit(bits: int) -> int:
    """Smallest number of values that fills a whole number of words (8 for 4-bit, 32 for 3-bit)."""
    return 32 // math.gcd(32, bits)


def packed_width(in_features: int, bits: int) -> int:
    """Number of int32 words per row."""
    pack_factor(bits)
    return math.ceil(in_features * bits / 32)


def _pack_rows(q: torch.Tensor, bits: int, words: int) -> torch.Tensor:
    rows, in_f = q.shape
    shifts = torch.arange(bits, device=q.device, dtype=torch.int64)
    stream = ((q.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(rows, in_f * bits)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - in_f * bits))
    w = (stream.view(rows, words, 32) << torch.arange(32, device=q.device, dtype=torch.int64)).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """`q` `[rows, in]` integers in `[0, 2^bits)` -> int32 `[rows, ceil(in * bits / 32)]`."""
    if q.ndim != 2:
        raise ValueError(f"pack expects a 2-D tensor, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(q.min())}, {int(q.max())}]")
    words = packed_width(q.shape[1], bits)
    return torch.cat([_pack_rows(c, bits, words) for c in q.split(_row_chunk(words * 32))]) if q.shape[0] else \
        torch.zeros(0, words, dtype=torch.int32)


def _unpack_rows(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    rows, words = packed.shape
    stream = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(32, device=packed.device)) & 1
    stream = stream.reshape(rows, words * 32)[:, : in_features * bits].reshape(rows, in_features, bits)
    vals = (stream << torch.arange(bits, device=packed.device, dtype=torch.int64)).sum(-1)
    return vals.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """int32 `[rows, words]` -> int32 `[rows, in_features]` in `[0, 2^bits)` (exact inverse of `pack`)."""
    if packed.shape[-1] != packed_width(in_features, bits):
        raise ValueError(
            f"packed width {packed.shape[-1]} does not hold {in_features} {bits}-bit values "
            f"(expected {packed_width(in_features, bits)} words)"
        )
    if packed.shape[0] == 0:
        return torch.zeros(0, in_features, dtype=torch.int32)
    return torch.cat([_unpack_rows(c, bits, in_features) for c in packed.split(_row_chunk(packed.shape[1] * 32))])
