"""A random checkpoint layer in the format's packed layout (tests of the runtime's base-GEMM kernels)."""

from __future__ import annotations

import torch

from vllm_qe.format.packing import pack
from vllm_qe.format.quantizer import num_groups


def random_packed_layer(bits: int, symmetric: bool, group: int, out_f: int, in_f: int,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(packed int32 words `[out, P]`, float16 scales `[out, G]`, uint8 zero points `[out, G]` or None) of
    uniformly random integers on the `bits` grid; scales in [1e-3, 2.1e-2)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.int32)
    ng = num_groups(in_f, group)
    scale = (torch.rand(out_f, ng, generator=g) * 0.02 + 1e-3).half()
    zero = None if symmetric else torch.randint(0, 2**bits, (out_f, ng), generator=g).to(torch.uint8)
    return pack(q, bits), scale, zero
