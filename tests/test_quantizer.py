"""Quantization primitives against straightforward (loop) references."""

from __future__ import annotations

import pytest
import torch

from vllm_qe.format.packing import pack, pack_factor, packed_width, unpack
from vllm_qe.format.quantizer import (
    compute_qparams,
    dequantize,
    fake_quantize_activation,
    fake_quantize_weight,
    num_groups,
    quantize,
)


def _reference_fake_quant(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                          sym_grid: str = "full") -> torch.Tensor:
    """Loop over rows and groups; the obvious textbook formula (symmetric: `max|w|` over `2^(b-1) - 1/2` on the
    full grid, over `2^(b-1) - 1` on the restricted one)."""
    out = torch.empty_like(w)
    gs = w.shape[1] if group_size == -1 else group_size
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], gs):
            g = w[r, start:start + gs]
            if symmetric:
                levels = 2 ** (bits - 1) - (0.5 if sym_grid == "full" else 1.0)
                s = torch.tensor(max(float(g.abs().max()) / levels, 1e-6)).half().float()
                z = 2 ** (bits - 1)
            else:
                lo, hi = min(float(g.min()), 0.0), max(float(g.max()), 0.0)
                s = torch.tensor(max((hi - lo) / (2**bits - 1), 1e-6)).half().float()
                z = float(torch.round(torch.tensor(-lo) / s).clamp(0, 2**bits - 1))
            q = torch.clamp(torch.round(g / s) + z, 0, 2**bits - 1)
            out[r, start:start + gs] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize(("symmetric", "sym_grid"), [(False, "full"), (True, "full"), (True, "restricted")])
def test_weight_fake_quant_matches_loop_reference(bits, group_size, symmetric, sym_grid):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(6, 256) * 0.05
    qp = compute_qparams(w, bits, group_size, symmetric, sym_grid=sym_grid)
    got = fake_quantize_weight(w, qp)
    torch.testing.assert_close(got, _reference_fake_quant(w, bits, group_size, symmetric, sym_grid), rtol=0, atol=1e-7)
    # error bound: half a step (symmetric; on the full grid the largest magnitude sits half a step past the last
    # level, plus the float16 rounding of the scale: 2^-11 relative over 2^(b-1) steps); one step when the rounded
    # zero point shifts the grid (asymmetric)
    step = qp.scale[:, torch.arange(256) // (256 if group_size == -1 else group_size)]
    bound = (0.5 + 2 ** (bits - 1) * 2.0**-11) if symmetric else 1.0
    assert ((got - w).abs() <= step * bound + 1e-6).all()


def test_ragged_last_group_is_quantized_on_its_own_channels():
    torch.manual_seed(0)
    w = torch.randn(4, 100)  # 100 = 3 * 32 + 4: the last group has 4 channels
    qp = compute_qparams(w, 4, 32, False)
    assert qp.scale.shape == (4, num_groups(100, 32)) == (4, 4)
    torch.testing.assert_close(fake_quantize_weight(w, qp), _reference_fake_quant(w, 4, 32, False), rtol=0, atol=1e-7)


def test_quantize_dequantize_roundtrip_integers():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    qp = compute_qparams(w, 4, 32, False)
    q = quantize(w, qp)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    torch.testing.assert_close(dequantize(q, qp.scale, qp.zero, 32), fake_quantize_weight(w, qp))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features", [1, 31, 64, 100])
def test_pack_unpack_exact(bits, in_features):
    g = torch.Generator().manual_seed(bits + in_features)
    q = torch.randint(0, 2**bits, (5, in_features), generator=g, dtype=torch.int32)
    packed = pack(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, packed_width(in_features, bits))
    assert torch.equal(unpack(packed, bits, in_features), q)


def test_pack_layout_is_little_end_first():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.int32)
    word = int(pack(q, 4)[0, 0]) & 0xFFFFFFFF
    assert word == sum(v << (4 * i) for i, v in enumerate([1, 2, 3, 4, 5, 6, 7, 15]))
    assert pack_factor(4) == 8


def test_3bit_is_a_bitstream_of_32_values_per_3_words():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 8, (3, 64), generator=g, dtype=torch.int32)
    packed = pack(q, 3)
    assert packed.shape == (3, 6)
    stream = sum(int(v) << (3 * i) for i, v in enumerate(q[1].tolist()))
    words = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(6)]
    assert [int(w) & 0xFFFFFFFF for w in packed[1]] == words
    # a 32-value slice (a tensor-parallel shard) is exactly 3 words
    assert torch.equal(unpack(packed[:, 3:], 3, 32), q[:, 32:])


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[16]]), 4)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_activation_fake_quant_per_token(bits):
    torch.manual_seed(bits)
    x = torch.randn(7, 48) * torch.linspace(0.1, 10, 7)[:, None]
    x[3] = 0
    got = fake_quantize_activation(x, bits)
    qmax = 2 ** (bits - 1) - 1
    for t in range(x.shape[0]):
        s = max(float(x[t].abs().max()) / qmax, 1e-12)
        ref = torch.clamp(torch.round(x[t] / s), -qmax - 1, qmax) * s
        torch.testing.assert_close(got[t], ref, rtol=0, atol=1e-6)
    assert torch.equal(got[3], torch.zeros(48))
    # each token keeps its own scale: a large token does not crush a small one
    assert (got[0] - x[0]).abs().max() < x[0].abs().max() / qmax


def test_unsupported_bits_are_rejected():
    with pytest.raises(ValueError, match="weight bits"):
        compute_qparams(torch.randn(2, 8), 5, 8, False)
    with pytest.raises(ValueError, match="activation bits"):
        fake_quantize_activation(torch.randn(2, 8), 3)
