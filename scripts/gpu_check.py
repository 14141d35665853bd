"""Correctness stage of `scripts/gpu_check.sh`: every Triton kernel the runtime can select, against the torch
reference, at the benchmark shapes.

    python scripts/gpu_check.py --out DIR [--budget-s 270] [--jobs 8]      # CUDA: the real check
    python scripts/gpu_check.py --dry-run --out DIR                         # CPU: TRITON_INTERPRET=1, tiny shapes

Families (each row of the result is one call, compared with `kernels/reference.py` / `kernels/triton/int8_reference.py`):

- `qe_gemm`: the linear base GEMM as the runtime calls it (`kernels.packed.TritonGemmKernel`: N-major scales after
  `process_weights_after_loading`, then the `vllm_qe::qe_gemm_packed` op -> `triton.gemm.qe_gemm`): W2/W3/W4/W8,
  group 128 / 64 / 32 / 16 (per-element scales) / per channel, symmetric and asymmetric, A16 and A8/A6/A4 (int8 MMA;
  the float-dot fallback where a K tile cannot sit in one group), smoothing, a given per-token absmax (TP), bf16 /
  fp16 / fp32 activations, the checkpoint's row-major scales;
- `quant_act`: the per-token int8 activation quantization kernel, bit-exact against `quantize_activations_reference`;
- `qe_linear`: `triton.qe_linear.qe_linear_packed` (GEMM + shared + routed adapters + bias, fused q/k/v splits);
- `lora`: `triton.lora.lowrank_add_` (shrink + expand), routed (8 experts, ranks 32/64) and shared, alignment
  blocks 16 and 64;
- `moe`: `kernels.packed.TritonMoEKernel` -> `vllm_qe::qe_fused_moe_packed` -> `triton.moe.fused_moe_qe` (grouped
  expert GEMMs + per-expert adapters, smoothing) at the Qwen3-VL-30B-A3B-like expert shape of `catalog.MOE_SHAPE`.

Every Triton launch is recorded (`triton.launcher.launch` is the one place the wrappers launch kernels) and matched
against `kernels/triton/catalog.py`'s list of what the runtime can launch: a catalog configuration that no row
launched is a failure (on the GPU run from the launches made; on the dry run from the GPU enumeration planned on
`meta` tensors, which runs the wrappers' host code at the real shapes without launching).

Error metric: `max|got - want| / max|want|` (`want` in float32 except where the reference itself rounds to the
activation dtype, e.g. the MoE's SwiGLU), against `TOLERANCE[dtype]`: the kernels' own arithmetic is exact up to
float32 accumulation order (integer `q - z` in the MMA's input type, int8 x int8 -> int32), so what remains is the
output's rounding to the activation dtype (<= 2^-9 of max for bf16) and, on the per-element-scale, smoothing and
adapter-expand paths, operand rounding (bf16 or tf32) of the same order; the tolerance is eps(dtype) (bf16: 2^-7)
or 2^-8 (fp16), and 1e-4 for float32 (IEEE dots), as `tests/test_kernels.py` holds the interpreter to. The
activation quantization kernel must be bit-exact (tolerance 0), as in `test_quantize_activations_is_bit_exact`.

The GPU run: 363 cases at M in {1, 16, 64, 256, 2048} (one M per row of the launch tables) or, for the option
configurations, {1, 2048}. The dry run runs every configuration of the same enumeration at tiny shapes (one layer
per family) and M in {1, 33, 257} / {1, 33} / {1} (decode swap-AB, small and prefill tiles; the <=256-row tile
and split-K-off launches are reached at the real shapes only, which the planned coverage checks), under the
Triton interpreter (`--jobs` workers, 2 by default; ~25 s of CPU). The
interpreter cannot run bfloat16 `tl.dot` (it multiplies the raw bit patterns: triton-lang/triton#11584), so bf16
rows run in float16 there: same kernels, same constexpr path (`DOT_IEEE=False`), half-precision operands.

Exit status: 0 all rows pass; 1 a row failed or errored, a catalog configuration was not launched, or vLLM was
imported (a lent GPU has no vLLM); 3 only skips (time budget); 2 usage / no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # plain checkout: `vllm_qe/__init__.py` maps vllm_qe.kernels -> kernels/
    sys.path.insert(0, str(ROOT))

FAMILIES = ("qe_gemm", "quant_act", "qe_linear", "lora", "moe")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Max |got - want| / max |want| per activation dtype (module docstring: why these).
TOLERANCE = {"float32": 1e-4, "bfloat16": 2.0**-7, "float16": 2.0**-8}
EXACT = 0.0
GPU_M = (1, 16, 64, 256, 2048)  # one M per row of the launch tables (<=16, <=64, <=256, larger)
DRY_M = (1, 33, 257)  # decode (swap-AB), small and prefill tiles, at interpreter cost (<=256: the GPU plan)
SPLITS_2B = {"qkv": (1536, 256, 256), "gate_up": (8960, 8960)}  # Qwen2-VL-2B's fused modules
STATUS = ("PASS", "FAIL", "ERROR", "SKIP")


@dataclass(frozen=True)
class Case:
    """One kernel call to check. GEMM-like families: `[m, k] x [n, k]ᵀ`; `moe`: `n` = hidden, `k` = expert width
    (intermediate), `m` = tokens; `lora`: `[m, k] -> [m, n]` through rank `rank` over `experts` adapters."""

    family: str
    config: str
    layer: str
    n: int
    k: int
    m: int
    dtype: str = "bfloat16"
    bits: int = 4
    group: int = 128
    sym: bool = False
    act_bits: int = 0
    smooth: bool = False
    absmax: bool = False
    layout: str = "nmajor"
    rank: int = 0
    experts: int = 0
    top_k: int = 0
    block_m: int = 0
    adapters: bool = False
    splits: tuple[int, ...] = ()

    def label(self) -> str:
        return f"{self.family} | {self.config} | {self.layer} {self.n}x{self.k} | M={self.m}"

    def seed(self) -> int:
        return zlib.crc32(self.label().encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class Sizes:
    """Shapes of one mode: the benchmark shapes (GPU) or their tiny stand-ins (dry run)."""

    gemm: tuple[tuple[str, int, int], ...]  # (layer, N, K)
    lora: tuple[tuple[str, int, int], ...]
    linear: tuple[tuple[str, tuple[int, ...], int], ...]  # (layer, out splits, K)
    moe: dict[str, int]
    ms_all: tuple[int, ...]  # every tile row
    ms_most: tuple[int, ...]  # the same on the GPU; the dry run leaves out its costly largest M
    ms_ends: tuple[int, ...]  # decode and prefill (dry run: decode)
    dtype: dict[str, str]  # dtype of the GPU configuration -> dtype run in this mode


def sizes(dry: bool) -> Sizes:
    """GPU: Qwen2-VL-2B's language-model layers (`aot.BENCH_SHAPES`), the LoRA benchmark layers (qkv, gate_up) and
    `catalog.MOE_SHAPE`; dry run: one tiny layer of each kind."""
    if dry:
        return Sizes(gemm=(("tiny", 96, 256),), lora=(("tiny", 96, 256),), linear=(("tiny qkv", (64, 32), 256),),
                     moe={"hidden": 128, "inter": 128, "experts": 4, "top_k": 2}, ms_all=DRY_M,
                     ms_most=DRY_M[:2], ms_ends=DRY_M[:1], dtype={"bfloat16": "float16"})
    from vllm_qe.kernels.aot import BENCH_SHAPES
    from vllm_qe.kernels.triton.catalog import MOE_SHAPE

    gemm = tuple((f"2b {layer}", n, k) for model, layer, n, k in BENCH_SHAPES if model == "2b")
    lora = tuple(s for s in gemm if s[0] in ("2b qkv", "2b gate_up"))
    linear = tuple((f"2b {layer}", splits, k) for layer, splits in SPLITS_2B.items()
                   for name, _, k in gemm if name == f"2b {layer}")
    return Sizes(gemm=gemm, lora=lora, linear=linear, moe=dict(MOE_SHAPE), ms_all=GPU_M, ms_most=GPU_M,
                 ms_ends=(GPU_M[0], GPU_M[-1]), dtype={})


def _ends(shapes: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys([shapes[0], shapes[-1]]))


def _wa(bits: int, act_bits: int, group: int, sym: bool, dtype: str) -> str:
    g = "per-channel" if group == -1 else f"g{group}"
    return f"W{bits}A{act_bits or 16} {g} {'sym' if sym else 'asym'} {dtype}"


def enumerate_cases(dry: bool) -> list[Case]:
    """Every configuration x layer x M of the check, in run order (the same list in both modes; shapes and M
    from `sizes`)."""
    sz = sizes(dry)
    out: list[Case] = []

    def ms(which: str) -> tuple[int, ...]:
        return {"all": sz.ms_all, "most": sz.ms_most, "ends": sz.ms_ends}[which]

    def gemm(bits: int, group: int, act: int, *, sym: bool = False, dtype: str = "bfloat16", smooth: bool = False,
             absmax: bool = False, layout: str = "nmajor", m: str = "all", shapes: str = "all") -> None:
        config = _wa(bits, act, group, sym, dtype) + (" smooth" if smooth else "") + (" absmax" if absmax else "") + \
            (" ckpt-scales" if layout == "ckpt" else "")
        for layer, n, k in (sz.gemm if shapes == "all" else _ends(sz.gemm)):
            for mm in ms(m):
                out.append(Case("qe_gemm", config, layer, n, k, mm, sz.dtype.get(dtype, dtype), bits, group, sym, act,
                                smooth, absmax, layout))

    # the launch tables: every tile row, split-K on and off (qkv splits K at small M, gate_up fills the GPU)
    for bits in (4, 3, 8):
        for act in (0, 8):
            gemm(bits, 128, act, m="all" if bits == 4 else "most")
    for act in (0, 8):  # groups smaller than a K tile shrink BLOCK_K (`gemm.k_block`)
        gemm(4, 32, act, m="most")
    for act in (0, 8):
        gemm(4, 64, act, m="ends")
    for act in (0, 8):
        gemm(4, 128, act, sym=True, m="ends", shapes="ends")
    gemm(8, 128, 0, sym=True, m="ends", shapes="ends")
    gemm(8, -1, 8, sym=True, m="ends", shapes="ends")
    gemm(4, -1, 0, m="ends", shapes="ends")
    gemm(3, 32, 8, m="ends", shapes="ends")
    for act in (0, 8):  # 3-bit group 16: per-element scales; A8 falls back to the float dot
        gemm(3, 16, act, m="ends", shapes="ends")
    for act in (6, 4):
        gemm(4, 128, act, m="ends", shapes="ends")
    for act in (0, 8):
        gemm(4, 128, act, smooth=True, m="ends", shapes="ends")
    gemm(4, 128, 8, smooth=True, absmax=True, m="ends", shapes="ends")
    for act in (0, 8):
        gemm(4, 128, act, dtype="float16", m="ends", shapes="ends")
    gemm(4, 128, 0, dtype="float32", m="ends", shapes="ends")
    gemm(4, 128, 0, layout="ckpt", m="ends", shapes="ends")
    for act in (0, 8):
        gemm(2, 128, act, m="ends", shapes="ends")

    for act, smooth, absmax in ((8, True, False), (6, True, False), (4, True, False), (8, False, False),
                                (8, True, True)):
        config = f"A{act}" + (" smooth" if smooth else "") + (" absmax" if absmax else "") + " bfloat16"
        for layer, n, k in _ends(sz.gemm):
            for mm in sz.ms_ends:
                out.append(Case("quant_act", config, layer, n, k, mm, sz.dtype.get("bfloat16", "bfloat16"),
                                act_bits=act, smooth=smooth, absmax=absmax))

    from vllm_qe.kernels.triton.catalog import LORA_EXPERTS, LORA_RANKS
    from vllm_qe.kernels.triton.moe import MOE_TILES

    for bits, act, which in ((4, 0, "most"), (4, 8, "most"), (3, 8, "ends")):
        config = _wa(bits, act, 128, False, "bfloat16") + f" smooth bias shared r{LORA_RANKS[0]} " \
            f"routed {LORA_EXPERTS}x r{LORA_RANKS[0]}"
        for layer, splits, k in sz.linear:
            for mm in ms(which):
                out.append(Case("qe_linear", config, layer, sum(splits), k, mm, sz.dtype.get("bfloat16", "bfloat16"),
                                bits, 128, False, act, True, rank=LORA_RANKS[0], experts=LORA_EXPERTS, splits=splits))

    lora_configs = [(LORA_EXPERTS, r, bm, "bfloat16", "most") for bm in sorted(MOE_TILES) for r in LORA_RANKS]
    lora_configs += [(1, LORA_RANKS[0], 16, "bfloat16", "ends"), (LORA_EXPERTS, LORA_RANKS[0], 16, "float32", "ends")]
    for e, r, bm, dtype, which in lora_configs:
        config = f"{'shared' if e == 1 else f'routed {e} experts'} r{r} block {bm} {dtype}"
        for layer, n, k in sz.lora:
            for mm in ms(which):
                out.append(Case("lora", config, layer, n, k, mm, sz.dtype.get(dtype, dtype), rank=r, experts=e,
                                block_m=bm))

    mo = sz.moe
    moe_layer = f"MoE E{mo['experts']} top{mo['top_k']}"
    r = LORA_RANKS[0]
    for bits, sym, adapters, smooth, which in ((4, False, True, False, "all"), (3, False, True, False, "most"),
                                               (8, False, True, False, "most"), (4, True, False, False, "ends"),
                                               (4, False, True, True, "ends")):
        config = _wa(bits, 0, 128, sym, "bfloat16") + (f" adapters r{r}" if adapters else "") + \
            (" smooth" if smooth else "")
        for mm in ms(which):
            out.append(Case("moe", config, moe_layer, mo["hidden"], mo["inter"], mm,
                            sz.dtype.get("bfloat16", "bfloat16"), bits, 128, sym, 0, smooth, rank=r if adapters else 0,
                            experts=mo["experts"], top_k=mo["top_k"], adapters=adapters))
    return out


# ----------------------------------------------------------------------------------------------------------------
# inputs


class Gen:
    """Seeded random tensors on `device`; on `meta` only shapes and dtypes (planning)."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.meta = device.type == "meta"
        self.g = None if self.meta else torch.Generator(device=device).manual_seed(seed)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        if self.meta:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return (torch.randn(shape, generator=self.g, device=self.device) * scale).to(dtype)

    def uniform(self, *shape: int, lo: float, hi: float) -> torch.Tensor:
        if self.meta:
            return torch.empty(shape, device=self.device)
        return torch.rand(shape, generator=self.g, device=self.device) * (hi - lo) + lo

    def randint(self, hi: int, *shape: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        if self.meta:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return torch.randint(0, hi, shape, generator=self.g, device=self.device, dtype=dtype)


@dataclass
class Packed:
    """A layer (or `[E, ...]` stack of experts) in the checkpoint's layout: `packed` int32 `[..., N, P]`, `scale`
    fp16 `[..., N, G]` (row-major, as stored), `zero` u8 `[..., N, G]` or None (symmetric), and `w` the float32
    dequantized weight `[..., N, K]` (the reference's input; None on meta)."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    w: torch.Tensor | None


_WEIGHTS: dict[tuple, Packed] = {}


def weights(n: int, k: int, bits: int, group: int, sym: bool, experts: int, device: torch.device, seed: int) -> Packed:
    """Uniformly random integers on the `bits` grid, scales in [1e-3, 2.1e-2), zero points on the grid; the
    reference weight through the format's own dequantization (`quantizer.dequantize`, `module.zero_points`).
    The last two layers made are cached (cases of one configuration share them; a MoE case uses two stacks)."""
    from vllm_qe.format.module import zero_points
    from vllm_qe.format.packing import pack, packed_width
    from vllm_qe.format.quantizer import dequantize, num_groups

    key = (n, k, bits, group, sym, experts, str(device), seed)
    if key in _WEIGHTS:
        return _WEIGHTS[key]
    while len(_WEIGHTS) >= 2:
        _WEIGHTS.pop(next(iter(_WEIGHTS)))
    gen = Gen(device, seed)
    rows, G = n * max(experts, 1), num_groups(k, group)
    q = gen.randint(2**bits, rows, k)
    scale = (gen.uniform(rows, G, lo=1e-3, hi=2.1e-2)).half()
    zero = None if sym else gen.randint(2**bits, rows, G)
    if gen.meta:
        packed, w = torch.empty(rows, packed_width(k, bits), dtype=torch.int32, device=gen.device), None
    else:
        packed = pack(q, bits)
        w = dequantize(q, scale.float(), zero_points(scale, zero, bits), group)
    del q
    if experts:
        def stack(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.view(experts, n, t.shape[-1])

        p = Packed(stack(packed), stack(scale), stack(zero), stack(w))
    else:
        p = Packed(packed, scale, zero, w)
    _WEIGHTS[key] = p
    return p


def _module(**tensors: torch.Tensor | None) -> torch.nn.Module:
    """A layer holding `tensors` as frozen parameters (what vLLM's loader leaves on a layer)."""
    layer = torch.nn.Module()
    for name, t in tensors.items():
        if t is not None:
            layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    return layer


# ----------------------------------------------------------------------------------------------------------------
# one case per family: (got, want, tolerance) or None when planning on meta

Result = tuple[torch.Tensor, torch.Tensor, float] | None


def run_gemm(c: Case, dev: torch.device, plan: bool) -> Result:
    """`TritonGemmKernel` as a QE linear layer runs it; reference `reference.base_gemm` on the dequantized weight."""
    from vllm_qe.format import spec
    from vllm_qe.kernels import reference
    from vllm_qe.kernels.base import KernelTarget, QELayerSpec
    from vllm_qe.kernels.packed import TritonGemmKernel
    from vllm_qe.kernels.triton.gemm import kernel_layout, qe_gemm

    dt = DTYPES[c.dtype]
    gen = Gen(dev, c.seed())
    W = weights(c.n, c.k, c.bits, c.group, c.sym, 0, dev, c.n * 31 + c.k * 7 + c.bits)
    x = gen.randn(c.m, c.k, dtype=dt)
    smooth = gen.uniform(c.k, lo=0.5, hi=1.5) if c.smooth else None
    absmax = None
    if c.absmax:  # a tensor-parallel rank gets the whole token's max |x / s|, at least its own slice's
        xs = x.float() if smooth is None else x.float() / smooth
        absmax = xs.abs().amax(-1, keepdim=True) * 1.25
    spec_ = QELayerSpec.build(c.k, c.n, c.k, c.n, c.bits, c.group, c.sym, c.act_bits, dt)
    ok, why = TritonGemmKernel.can_implement(spec_, KernelTarget("cuda", 90))
    if not ok:
        raise RuntimeError(f"the runtime would not select TritonGemmKernel: {why}")
    if plan:  # the op's CUDA branch, called directly (a custom op on meta tensors runs its fake)
        scale, zero = kernel_layout(W.scale, W.zero) if c.layout == "nmajor" else (W.scale, W.zero)
        qe_gemm(x, W.packed, scale, zero, c.bits, c.group, smooth=smooth, act_bits=c.act_bits, act_absmax=absmax)
        return None
    layer = _module(**{spec.WEIGHT_PACKED: W.packed, spec.WEIGHT_SCALE: W.scale, spec.WEIGHT_ZERO: W.zero})
    kern = TritonGemmKernel(spec_)
    if c.layout == "nmajor":
        kern.process_weights_after_loading(layer)
    got = kern.forward(layer, x, smooth, absmax)
    want = reference.base_gemm(x, W.w, smooth, c.act_bits or None, absmax)
    return got, want, TOLERANCE[c.dtype]


def run_quant_act(c: Case, dev: torch.device, plan: bool) -> Result:
    """`gemm.quantize_activations` (int8 values and per-token scales) against the exact torch twin."""
    from vllm_qe.kernels.triton.gemm import quantize_activations
    from vllm_qe.kernels.triton.int8_reference import quantize_activations_reference

    gen = Gen(dev, c.seed())
    x = gen.randn(c.m, c.k, dtype=DTYPES[c.dtype], scale=3.0)
    smooth = gen.uniform(c.k, lo=0.5, hi=1.5) if c.smooth else None
    absmax = None
    if c.absmax:
        xs = x.float() if smooth is None else x.float() / smooth
        absmax = xs.abs().amax(-1, keepdim=True) * 1.25
    xq, xs_ = quantize_activations(x, c.act_bits, smooth, absmax)
    if plan:
        return None
    want_q, want_s = quantize_activations_reference(x, c.act_bits, smooth, absmax)
    # one tensor: the integers, then the scales relative to their max (exact match required)
    got = torch.cat([xq.double().reshape(-1), xs_.double() / want_s.double().abs().max()])
    want = torch.cat([want_q.double().reshape(-1), want_s.double() / want_s.double().abs().max()])
    return got, want, EXACT


def _adapters(gen: Gen, c: Case, n_mod: int, dt: torch.dtype, n: int, k: int) -> dict[str, torch.Tensor]:
    r, e = c.rank, c.experts
    return {"shared_a": gen.randn(n_mod * r, k, dtype=dt, scale=0.05), "shared_b": gen.randn(n, r, dtype=dt, scale=0.05),
            "routed_a": gen.randn(n_mod * e, r, k, dtype=dt, scale=0.05),
            "routed_b": gen.randn(e, n, r, dtype=dt, scale=0.05)}


def run_qe_linear(c: Case, dev: torch.device, plan: bool) -> Result:
    """`qe_linear_packed` (fused modules, smoothing, bias, shared + routed adapters) against `reference.qe_linear`."""
    from vllm_qe.kernels import reference
    from vllm_qe.kernels.triton.gemm import kernel_layout
    from vllm_qe.kernels.triton.qe_linear import qe_linear_packed

    dt = DTYPES[c.dtype]
    gen = Gen(dev, c.seed())
    W = weights(c.n, c.k, c.bits, c.group, c.sym, 0, dev, c.n * 31 + c.k * 7 + c.bits)
    x = gen.randn(c.m, c.k, dtype=dt)
    smooth = gen.uniform(c.k, lo=0.5, hi=1.5)
    bias = gen.randn(c.n, dtype=dt)
    ad = _adapters(gen, c, len(c.splits), dt, c.n, c.k)
    router = gen.uniform(len(c.splits) * c.experts, c.k, lo=0.0, hi=1.0)
    ids = reference.route_grouped(reference.router_scores(x, router), len(c.splits))
    scale, zero = kernel_layout(W.scale, W.zero)
    got = qe_linear_packed(x, W.packed, scale, zero, c.bits, c.group, bias, smooth, c.act_bits, list(c.splits),
                           ad["shared_a"], ad["shared_b"], ad["routed_a"], ad["routed_b"], ids)
    if plan:
        return None
    want = reference.qe_linear(x.float(), W.w, bias, act_bits=c.act_bits or None, smooth=smooth,
                               out_splits=list(c.splits), expert_ids=ids, **ad)
    return got, want, TOLERANCE[c.dtype]


def run_lora(c: Case, dev: torch.device, plan: bool) -> Result:
    """`lowrank_add_` (shrink + expand, accumulating into a non-zero float32 output) against
    `reference.routed_lowrank`."""
    from vllm_qe.kernels import reference
    from vllm_qe.kernels.triton.lora import lowrank_add_

    dt = DTYPES[c.dtype]
    gen = Gen(dev, c.seed())
    x = gen.randn(c.m, c.k, dtype=dt)
    a = gen.randn(c.experts, c.rank, c.k, dtype=dt, scale=0.1)
    b = gen.randn(c.experts, c.n, c.rank, dtype=dt, scale=0.1)
    ids = gen.randint(c.experts, c.m, dtype=torch.int64)
    y0 = gen.randn(c.m, c.n)
    y = lowrank_add_(y0.clone(), x, a, b, ids, block_m=c.block_m)
    if plan:
        return None
    return y, y0 + reference.routed_lowrank(x, a, b, ids), TOLERANCE[c.dtype]


def run_moe(c: Case, dev: torch.device, plan: bool) -> Result:
    """`TritonMoEKernel` as a QE MoE layer runs it (checkpoint-layout experts) against `reference.fused_moe` (which
    rounds the SwiGLU activation to the activation dtype, as the kernel stores it)."""
    from vllm_qe.format import spec
    from vllm_qe.kernels import reference
    from vllm_qe.kernels.base import KernelTarget, QELayerSpec
    from vllm_qe.kernels.packed import TritonMoEKernel
    from vllm_qe.kernels.triton.moe import fused_moe_qe

    dt = DTYPES[c.dtype]
    H, inter, E, topk = c.n, c.k, c.experts, c.top_k
    gen = Gen(dev, c.seed())
    w13 = weights(2 * inter, H, c.bits, c.group, c.sym, E, dev, c.bits * 1000 + 13)
    w2 = weights(H, inter, c.bits, c.group, c.sym, E, dev, c.bits * 1000 + 2)
    x = gen.randn(c.m, H, dtype=dt)
    if gen.meta:
        ids = torch.empty(c.m, topk, dtype=torch.int64, device=dev)
        wts = torch.empty(c.m, topk, device=dev)
    else:
        ids = gen.uniform(c.m, E, lo=0.0, hi=1.0).topk(topk, dim=-1).indices
        wts = torch.softmax(gen.randn(c.m, topk), -1)
    ad: tuple[torch.Tensor | None, ...] = (None, None, None, None)
    if c.adapters:
        ad = (gen.randn(E, c.rank, H, dtype=dt, scale=0.05), gen.randn(E, 2 * inter, c.rank, dtype=dt, scale=0.05),
              gen.randn(E, c.rank, inter, dtype=dt, scale=0.05), gen.randn(E, H, c.rank, dtype=dt, scale=0.05))
    sm: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if c.smooth:
        sm = (gen.uniform(E, H, lo=0.5, hi=1.5), gen.uniform(E, inter, lo=0.5, hi=1.5))
    c13 = QELayerSpec.build(H, 2 * inter, H, 2 * inter, c.bits, c.group, c.sym, 0, dt)
    c2 = QELayerSpec.build(inter, H, inter, H, c.bits, c.group, c.sym, 0, dt)
    ok, why = TritonMoEKernel.can_implement(c13, c2, KernelTarget("cuda", 90))
    if not ok:
        raise RuntimeError(f"the runtime would not select TritonMoEKernel: {why}")
    if plan:
        fused_moe_qe(x, (w13.packed, w13.scale, w13.zero), (w2.packed, w2.scale, w2.zero), c.bits, c.group, ids, wts,
                     None if ad[0] is None else ad[:2], None if ad[2] is None else ad[2:], smooth13=sm[0],
                     smooth2=sm[1])
        return None
    p = "w13_"
    layer = _module(**{p + spec.WEIGHT_PACKED: w13.packed, p + spec.WEIGHT_SCALE: w13.scale,
                       p + spec.WEIGHT_ZERO: w13.zero, "w2_" + spec.WEIGHT_PACKED: w2.packed,
                       "w2_" + spec.WEIGHT_SCALE: w2.scale, "w2_" + spec.WEIGHT_ZERO: w2.zero})
    got = TritonMoEKernel(c13, c2).apply(layer, x, ids, wts, ad, sm)
    w13d, w2d = w13.w, w2.w
    if c.smooth:
        w13d, w2d = w13d / sm[0][:, None, :], w2d / sm[1][:, None, :]
    want = reference.fused_moe(x, w13d, w2d, ids, wts, None if ad[0] is None else ad[:2],
                               None if ad[2] is None else ad[2:])
    return got, want, TOLERANCE[c.dtype]


RUNNERS: dict[str, Callable[[Case, torch.device, bool], Result]] = {
    "qe_gemm": run_gemm, "quant_act": run_quant_act, "qe_linear": run_qe_linear, "lora": run_lora, "moe": run_moe}


# ----------------------------------------------------------------------------------------------------------------
# comparison, launches, coverage


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """`max|got - want| / max|want|` in float64 (NaN or inf in `got` gives NaN / inf, never a pass)."""
    g, w = got.detach().double(), want.detach().double()
    if g.shape != w.shape:
        raise ValueError(f"shape {tuple(g.shape)} != reference {tuple(w.shape)}")
    if not torch.isfinite(g).all():
        return float("nan")
    return float((g - w).abs().max() / w.abs().max().clamp_min(1e-30))


def faulty(want: torch.Tensor, tol: float) -> torch.Tensor:
    """A deliberately wrong reference (`--inject-fault`): scaled by 1 + 4·tol (so an exact kernel sits at ~4x the
    tolerance), or one element off by one for exact comparisons."""
    if tol == 0:
        w = want.clone()
        w.view(-1)[0] += 1
        return w
    return want * (1 + 4 * tol)


def judge(got: torch.Tensor, want: torch.Tensor, tol: float) -> tuple[str, float]:
    """("PASS" | "FAIL", error): pass when the error is at most `tol`."""
    err = rel_err(got, want)
    return ("PASS" if err <= tol else "FAIL"), err


def kernel_name(kernel: Any) -> str:
    """Name of a `@triton.jit` kernel (JIT or interpreted function)."""
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(kernel))


def _spec_class(v: Any) -> str:
    """Triton's specialization class of a launch argument: ints equal to 1 / divisible by 16 compile apart."""
    if isinstance(v, bool) or not isinstance(v, int):
        return str(v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__
    return "1" if v == 1 else "d16" if v % 16 == 0 else "i"


class Recorder:
    """Wraps `kernels.triton.launcher.launch` (the one place the wrappers launch kernels): every launch is recorded
    as {name, grid, constexpr kwargs, specialization}; `execute=False` records without launching (planning)."""

    def __init__(self, execute: bool) -> None:
        from vllm_qe.kernels.triton import launcher

        self.launches: list[dict[str, Any]] = []
        real = getattr(launcher, "_unrecorded_launch", launcher.launch)  # a second recorder wraps the real one
        launcher._unrecorded_launch = real

        def launch(kernel: Any, grid: Sequence[int], *args: Any, **kwargs: Any) -> None:
            self.launches.append({"name": kernel_name(kernel), "grid": [int(g) for g in grid],
                                  "kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))},
                                  "spec": [_spec_class(a) for a in args]})
            if execute:
                real(kernel, grid, *args, **kwargs)

        launcher.launch = launch

    def take(self) -> list[dict[str, Any]]:
        out, self.launches = self.launches, []
        return out


def describe_launch(ln: dict[str, Any]) -> str:
    """`_qe_gemm_kernel W4 BM16xBN64xBK128 w4s4 swapAB atomic int8 grid[1, 32, 4]`."""
    kw = ln["kwargs"]
    parts = [ln["name"]]
    if "BITS" in kw:
        parts.append(f"W{kw['BITS']}")
    if "ACT_BITS" in kw:
        parts.append(f"A{kw['ACT_BITS']}")
    blocks = [f"{a}{kw[b]}" for a, b in (("BM", "BLOCK_M"), ("BN", "BLOCK_N"), ("BR", "BLOCK_R"), ("BK", "BLOCK_K"))
              if b in kw]
    if blocks:
        parts.append("x".join(blocks))
    if "num_warps" in kw:
        parts.append(f"w{kw['num_warps']}s{kw.get('num_stages', '?')}")
    flags = [f for f, key in (("swapAB", "SWAP_AB"), ("atomic", "ATOMIC"), ("int8", "INT8"), ("sym", "SYM"),
                              ("smooth", "HAS_SMOOTH"), ("amax", "HAS_AMAX"), ("ieee", "DOT_IEEE")) if kw.get(key)]
    if kw.get("PER_TILE_GROUP") is False:
        flags.append("per-elem")
    return " ".join(parts + flags + [f"grid{ln['grid']}"])


def coverage(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration of `catalog.aot_variants()` (what the runtime can launch): the first row whose launches
    match its kernel, constexprs and (where the launch sets them) warps/stages; `row` None = never launched."""
    from vllm_qe.kernels.triton import catalog

    out = []
    for v in catalog.aot_variants():
        name = kernel_name(v.fn)
        want = {k: val for k, val in v.constexprs.items() if k.isupper()}

        def hit(ln: dict[str, Any], v=v, name=name, want=want) -> bool:
            kw = ln["kwargs"]
            return (ln["name"] == name and all(kw.get(k) == val for k, val in want.items())
                    and kw.get("num_warps", v.num_warps) == v.num_warps
                    and kw.get("num_stages", v.num_stages) == v.num_stages)

        first = next((r["i"] for r in rows if any(hit(ln) for ln in r.get("launches", []))), None)
        out.append({"kernel": v.kernel, "config": v.config, "row": first})
    return out


def compilations(rows: Iterable[dict[str, Any]]) -> int:
    """Distinct (kernel, constexprs, argument specialization) launched: about the Triton compilations a cold cache
    makes."""
    keys = set()
    for r in rows:
        for ln in r.get("launches", []):
            keys.add((ln["name"], json.dumps(ln["kwargs"], sort_keys=True), tuple(ln["spec"])))
    return len(keys)


def vllm_modules() -> list[str]:
    """vLLM modules this process imported (a lent GPU has no vLLM: none may be needed)."""
    return sorted(m for m, mod in sys.modules.items() if (m == "vllm" or m.startswith("vllm.")) and mod is not None)


# ----------------------------------------------------------------------------------------------------------------
# running


def run_cases(cases: Sequence[Case], indices: Sequence[int], device: torch.device, deadline: float,
              inject_fault: bool, emit: Callable[[dict[str, Any]], None], tag: str = "") -> None:
    """Run `cases[i]` for `i` in `indices` on `device`, one row each through `emit`; past `deadline` (time.time())
    the rest are SKIP rows."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference in float32, not tf32
        torch.set_float32_matmul_precision("highest")
    rec = Recorder(execute=True)
    for i in indices:
        c = cases[i]
        row: dict[str, Any] = {"i": i, **_case_fields(c), "tol": None, "err": None, "launches": [], "message": ""}
        if time.time() > deadline:
            emit({**row, "status": "SKIP", "seconds": 0.0, "message": "time budget"})
            continue
        t0 = time.perf_counter()
        try:
            got, want, tol = RUNNERS[c.family](c, device, False)  # type: ignore[misc]
            if inject_fault:
                want = faulty(want, tol)
            status, err = judge(got, want, tol)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row.update(status=status, err=err, tol=tol)
            del got, want
        except Exception as e:  # noqa: BLE001 - a crash is a failed row, the rest still run
            row.update(status="ERROR", message=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            print(f"{tag}[{i:4d}] traceback:\n{traceback.format_exc()}", flush=True)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        row["launches"] = rec.take()
        emit(row)
        err_s = "-" if row["err"] is None else f"{row['err']:.2e}"
        print(f"{tag}[{i:4d}] {row['status']:5s} err {err_s:>9s} tol {row['tol']} {row['seconds']:7.2f}s  "
              f"{c.label()}  {row['message']}", flush=True)


def plan_cases(cases: Sequence[Case]) -> list[dict[str, Any]]:
    """Every case's wrapper host code on `meta` tensors, launches recorded and not made: what the GPU run
    launches (the plan of the dry run)."""
    rec = Recorder(execute=False)
    rows = []
    meta = torch.device("meta")
    for i, c in enumerate(cases):
        row: dict[str, Any] = {"i": i, **_case_fields(c), "status": "PLANNED", "message": ""}
        try:
            RUNNERS[c.family](c, meta, True)
        except Exception as e:  # noqa: BLE001
            row.update(status="ERROR", message=f"{type(e).__name__}: {e}")
        row["launches"] = rec.take()
        rows.append(row)
    _WEIGHTS.clear()
    return rows


def _case_fields(c: Case) -> dict[str, Any]:
    d = asdict(c)
    d["splits"] = list(c.splits)
    return d


def shard(cases: Sequence[Case], indices: Sequence[int], jobs: int) -> list[list[int]]:
    """`indices` per worker: whole configurations (they share weights and compiled kernels) to the least loaded
    worker, largest first (MoE configurations count double: their weights are large)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i in indices:
        groups.setdefault((cases[i].family, cases[i].config), []).append(i)
    load = [0.0] * jobs
    out: list[list[int]] = [[] for _ in range(jobs)]
    for key, idx in sorted(groups.items(), key=lambda kv: -len(kv[1]) * (2 if kv[0][0] == "moe" else 1)):
        w = min(range(jobs), key=lambda j: load[j])
        out[w].extend(idx)
        load[w] += len(idx) * (2 if key[0] == "moe" else 1)
    return [sorted(o) for o in out if o]


def run_parallel(cases: Sequence[Case], indices: Sequence[int], args: argparse.Namespace, deadline: float
                 ) -> tuple[list[dict], list[dict]]:
    """Rows of `cases[i]`, `i` in `indices` (in case order), and each worker's environment record; `args.jobs` > 1:
    that many worker processes (compilation is CPU-bound, one thread per process), each on the same device."""
    rows: list[dict[str, Any]] = []
    envs: list[dict[str, Any]] = []
    shards = shard(cases, indices, max(1, args.jobs))
    if len(shards) <= 1:
        run_cases(cases, shards[0] if shards else [], _device(args.dry_run), deadline, args.inject_fault, rows.append)
        envs.append(worker_env())
        return sorted(rows, key=lambda r: r["i"]), envs
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        procs = []
        for w, idx in enumerate(shards):
            idx_file, rows_file = Path(tmp) / f"shard{w}.json", Path(tmp) / f"rows{w}.jsonl"
            idx_file.write_text(json.dumps(idx))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(idx_file), "--rows", str(rows_file),
                   "--deadline", str(deadline), "--tag", f"w{w}"] + (["--dry-run"] if args.dry_run else []) + \
                (["--inject-fault"] if args.inject_fault else []) + (["--only", *args.only] if args.only else [])
            procs.append((subprocess.Popen(cmd), idx, rows_file))
        for p, idx, rows_file in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time() + 60))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            got: dict[int, dict[str, Any]] = {}
            if rows_file.exists():
                for line in rows_file.read_text().splitlines():
                    rec = json.loads(line)
                    if "worker_env" in rec:
                        envs.append(rec["worker_env"])
                    else:
                        got[rec["i"]] = rec
            for i in idx:
                rows.append(got.get(i) or {"i": i, **_case_fields(cases[i]), "status": "ERROR", "err": None, "tol": None,
                                           "seconds": 0.0, "launches": [],
                                           "message": f"worker exited (rc {p.returncode}) before this case"})
    return sorted(rows, key=lambda r: r["i"]), envs


def _device(dry: bool) -> torch.device:
    return torch.device("cpu" if dry else "cuda")


def worker_env() -> dict[str, Any]:
    import triton

    env = {"pid": os.getpid(), "torch": torch.__version__, "triton": triton.__version__,
           "interpret": os.environ.get("TRITON_INTERPRET") == "1", "vllm_modules": vllm_modules()}
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}")
    return env


def worker_main(args: argparse.Namespace) -> int:
    cases = select(enumerate_cases(args.dry_run), args.only)
    indices = json.loads(Path(args.worker).read_text())
    with open(args.rows, "a") as f:
        def emit(row: dict[str, Any]) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()

        run_cases(cases, indices, _device(args.dry_run), args.deadline, args.inject_fault, emit, tag=args.tag + " ")
        emit({"worker_env": worker_env()})
    return 0


def select(cases: list[Case], only: Sequence[str] | None) -> list[Case]:
    return [c for c in cases if not only or c.family in only]


# ----------------------------------------------------------------------------------------------------------------
# reports


def _fmt_err(r: dict[str, Any]) -> str:
    return "-" if r.get("err") is None else f"{r['err']:.2e}"


def results_table(rows: Sequence[dict[str, Any]], status_col: bool = True) -> list[str]:
    head = "| # | family | configuration | layer (N x K) | M | dtype | kernels launched |"
    head += " max rel err | tol | result | s |" if status_col else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        launches = "<br>".join(describe_launch(ln) for ln in r.get("launches", [])) or "-"
        line = f"| {r['i']} | {r['family']} | {r['config']} | {r['layer']} {r['n']}x{r['k']} | {r['m']} | {r['dtype']} | " \
            f"{launches} |"
        if status_col:
            tol = "-" if r.get("tol") is None else f"{r['tol']:.1e}"
            res = r["status"] + (f": {r['message']}" if r.get("message") else "")
            line += f" {_fmt_err(r)} | {tol} | {res} | {r.get('seconds', 0):.2f} |"
        lines.append(line)
    return lines


def coverage_table(cov: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| kernel | catalog configuration | first row launching it |", "|---|---|---|"]
    for c in cov:
        lines.append(f"| {c['kernel']} | {c['config']} | {'NOT LAUNCHED' if c['row'] is None else c['row']} |")
    return lines


def counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    out = dict.fromkeys(STATUS, 0)
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def family_summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| family | rows | pass | fail | error | skip | worst err / tol |", "|---|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        rs = [r for r in rows if r["family"] == fam]
        if not rs:
            continue
        n = counts(rs)
        ratios = [r["err"] / r["tol"] if r["tol"] else (0.0 if r["err"] == 0 else float("inf"))
                  for r in rs if r.get("err") is not None]
        worst = f"{max(ratios):.3f}" if ratios else "-"
        lines.append(f"| {fam} | {len(rs)} | {n['PASS']} | {n['FAIL']} | {n['ERROR']} | {n['SKIP']} | {worst} |")
    return lines


def write_plan(path: Path, plan: Sequence[dict[str, Any]], cov: Sequence[dict[str, Any]]) -> None:
    fams = {f: sum(1 for r in plan if r["family"] == f) for f in FAMILIES}
    missing = [c for c in cov if c["row"] is None]
    lines = [
        "# GPU check plan (what `scripts/gpu_check.sh` runs on a CUDA device)",
        "",
        f"{len(plan)} correctness cases ({', '.join(f'{f} {n}' for f, n in fams.items())}), launching "
        f"{sum(len(r['launches']) for r in plan)} Triton kernels in about {compilations(plan)} distinct "
        "compilations (kernel x constexprs x argument specialization); planned on `meta` tensors with the "
        "wrappers' own host code (no launch).",
        f"Catalog coverage (`kernels/triton/catalog.py`): {len(cov) - len(missing)}/{len(cov)} configurations "
        "the runtime can launch are launched by these cases.",
        "",
        "## Cases",
        "",
        *results_table(plan, status_col=False),
        "",
        "## Catalog coverage",
        "",
        *coverage_table(cov),
        "",
    ]
    path.write_text("\n".join(lines))


def write_results(out: Path, mode: str, rows: Sequence[dict[str, Any]], cov: Sequence[dict[str, Any]],
                  envs: Sequence[dict[str, Any]], elapsed: float, inject_fault: bool) -> dict[str, Any]:
    n = counts(rows)
    missing = [c for c in cov if c["row"] is None]
    vllm = sorted({m for e in envs for m in e.get("vllm_modules", [])} | set(vllm_modules()))
    ok = n["FAIL"] == 0 and n["ERROR"] == 0 and not missing and not vllm
    verdict = "PASS" if ok and n["SKIP"] == 0 else ("INCOMPLETE" if ok else "FAIL")
    summary = {"mode": mode, "verdict": verdict, "counts": n, "rows": len(rows), "catalog_total": len(cov),
               "catalog_missing": [f"{c['kernel']} [{c['config']}]" for c in missing], "vllm_modules": vllm,
               "families": {f: sum(1 for r in rows if r["family"] == f) for f in FAMILIES},
               "kernels_launched": sorted({ln["name"] for r in rows for ln in r.get("launches", [])}),
               "compilations": compilations(rows), "elapsed_s": round(elapsed, 1), "inject_fault": inject_fault,
               "workers": list(envs)}
    (out / "correctness.json").write_text(json.dumps({"summary": summary, "coverage": list(cov), "rows": list(rows)},
                                                     indent=1))
    env0 = envs[0] if envs else {}
    lines = [
        f"# Triton kernels vs the torch reference ({mode})",
        "",
        f"Verdict: **{verdict}**: {n['PASS']} pass, {n['FAIL']} fail, {n['ERROR']} error, {n['SKIP']} skipped "
        f"of {len(rows)} rows in {elapsed:.0f} s ({len(envs)} worker(s)); catalog configurations launched: "
        f"{len(cov) - len(missing)}/{len(cov)}; vLLM modules imported: {', '.join(vllm) or 'none'}.",
        f"Device: {env0.get('device', 'CPU (Triton interpreter)' if env0.get('interpret') else '?')}; torch "
        f"{env0.get('torch', '?')}; triton {env0.get('triton', '?')}. Error = max|got - want| / max|want| against the "
        "torch reference; tol: bf16 2^-7, fp16 2^-8, fp32 1e-4, activation quantization exact (0)."
        + (" **--inject-fault: every reference was made wrong on purpose; every row must FAIL.**" if inject_fault
           else ""),
        "",
        *family_summary(rows),
        "",
        "## Rows",
        "",
        *results_table(rows),
        "",
        "## Catalog coverage (kernels/triton/catalog.py: what the runtime can launch)",
        "",
        *coverage_table(cov),
        "",
    ]
    (out / "correctness.md").write_text("\n".join(lines))
    return summary


def correctness_main(args: argparse.Namespace) -> int:
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run on a machine without one)", file=sys.stderr)
        return 2
    gpu_cases = select(enumerate_cases(False), args.only)
    if args.dry_run:
        plan = plan_cases(gpu_cases)
        cov_plan = coverage(plan)
        write_plan(out / "gpu-plan.md", plan, cov_plan)
        bad_plan = [r for r in plan if r["status"] == "ERROR"]
        print(f"GPU plan: {len(plan)} cases, ~{compilations(plan)} compilations, catalog "
              f"{sum(c['row'] is not None for c in cov_plan)}/{len(cov_plan)} covered, {len(bad_plan)} planning "
              f"errors -> {out / 'gpu-plan.md'}", flush=True)
        for r in bad_plan[:10]:
            print(f"  plan error [{r['i']}] {r['family']} {r['config']}: {r['message']}", flush=True)
        cases = select(enumerate_cases(True), args.only)
    else:
        cases, plan, cov_plan, bad_plan = gpu_cases, [], [], []
    indices = list(range(len(cases)))
    if args.first_of_each:  # the first case of every configuration
        firsts: dict[tuple[str, str], int] = {}
        for i, c in enumerate(cases):
            firsts.setdefault((c.family, c.config), i)
        indices = sorted(firsts.values())
    if args.max_cases:
        indices = indices[: args.max_cases]
    print(f"running {len(indices)} of {len(cases)} cases ({'dry run: CPU, TRITON_INTERPRET=1, tiny shapes' if args.dry_run else 'CUDA'})"
          f", {max(1, args.jobs)} worker(s), budget {args.budget_s:.0f} s", flush=True)
    rows, envs = run_parallel(cases, indices, args, t0 + args.budget_s)
    # GPU: coverage from the launches made; dry run: from the GPU plan (tiny shapes cannot reach every tile)
    cov = coverage(rows) if not args.dry_run else cov_plan
    if args.only or (not args.dry_run and len(indices) < len(cases)):  # a subset cannot cover the catalog
        cov = [c for c in cov if c["row"] is not None]
    summary = write_results(out, "dry run (CPU, Triton interpreter, tiny shapes)" if args.dry_run else "CUDA",
                            rows, cov, envs, time.time() - t0, args.inject_fault)
    if bad_plan:
        summary["verdict"] = "FAIL"
    n = summary["counts"]
    print(f"correctness: {summary['verdict']}: {n['PASS']} pass, {n['FAIL']} fail, {n['ERROR']} error, {n['SKIP']} skip; "
          f"catalog {summary['catalog_total'] - len(summary['catalog_missing'])}/{summary['catalog_total']}; "
          f"kernels launched: {', '.join(summary['kernels_launched'])}; vLLM imported: "
          f"{', '.join(summary['vllm_modules']) or 'no'} -> {out / 'correctness.md'}", flush=True)
    for m in summary["catalog_missing"]:
        print(f"  not launched: {m}", flush=True)
    return {"PASS": 0, "INCOMPLETE": 3}.get(summary["verdict"], 1)


# ----------------------------------------------------------------------------------------------------------------
# summary of the whole check (called by gpu_check.sh)


def summarize_main(args: argparse.Namespace) -> int:
    """summary.md from the stages' exit codes (`--stage name=rc:seconds`), correctness.json and bench.md."""
    out = Path(args.summarize)
    stages = []
    for s in args.stage or []:
        name, _, rest = s.partition("=")
        rc, _, secs = rest.partition(":")
        stages.append((name, rc, secs))
    lines = [f"# GPU check summary ({time.strftime('%Y-%m-%d %H:%M:%S')})", "", "| stage | exit | seconds |",
             "|---|---|---|", *[f"| {n} | {rc} | {s} |" for n, rc, s in stages], ""]
    cj = out / "correctness.json"
    if cj.exists():
        s = json.loads(cj.read_text())["summary"]
        n = s["counts"]
        lines += [f"Correctness ({s['mode']}): **{s['verdict']}**: {n['PASS']} pass, {n['FAIL']} fail, "
                  f"{n['ERROR']} error, {n['SKIP']} skipped of {s['rows']} rows; catalog configurations launched "
                  f"{s['catalog_total'] - len(s['catalog_missing'])}/{s['catalog_total']}; Triton kernels launched: "
                  f"{', '.join(s['kernels_launched'])}; vLLM modules imported: {', '.join(s['vllm_modules']) or 'none'}.",
                  ""]
        rows = json.loads(cj.read_text())["rows"]
        bad = [r for r in rows if r["status"] in ("FAIL", "ERROR")]
        if bad:
            lines += ["Failing rows (first 30; all in correctness.md):", ""]
            lines += [f"- [{r['i']}] {r['status']} {r['family']} | {r['config']} | {r['layer']} {r['n']}x{r['k']} | "
                      f"M={r['m']}: err {_fmt_err(r)} {r.get('message', '')}" for r in bad[:30]]
            lines.append("")
        lines += family_summary(rows) + [""]
    else:
        lines += ["Correctness: no correctness.json (the stage did not finish).", ""]
    bench = out / "bench.md"
    if bench.exists():
        rows_b = [ln for ln in bench.read_text().splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
        lines += [f"Benchmark: {len(rows_b)} rows in bench.md.", ""]
    else:
        lines += ["Benchmark: no bench.md (see bench.log).", ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for correctness.md / correctness.json (+ gpu-plan.md)")
    p.add_argument("--dry-run", action="store_true", help="CPU: Triton interpreter, tiny shapes; plan the GPU run")
    p.add_argument("--budget-s", type=float, default=270.0, help="cases not started by then are skipped")
    p.add_argument("--jobs", type=int, default=0, help="worker processes (0: 8 on CUDA, capped by CPUs; 1 dry)")
    p.add_argument("--only", nargs="+", choices=FAMILIES, default=None, help="run these families only")
    p.add_argument("--max-cases", type=int, default=0, help="run the first N cases only (0: all)")
    p.add_argument("--first-of-each", action="store_true", help="run the first case of each configuration only")
    p.add_argument("--inject-fault", action="store_true", help="compare against a wrong reference: all must FAIL")
    p.add_argument("--summarize", default=None, metavar="DIR", help="write DIR/summary.md and exit")
    p.add_argument("--stage", action="append", help="with --summarize: name=rc:seconds of a stage")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.summarize:
        return summarize_main(args)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # the interpreter is chosen when @triton.jit runs (module import): restart with it set from the start
        env = dict(os.environ, TRITON_INTERPRET="1", VLLM_QE_FORCE_TRITON="1")
        return subprocess.call([sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None
                                                                               else sys.argv[1:])], env=env)
    if not args.dry_run and os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_check: TRITON_INTERPRET=1 is set; unset it for the CUDA run (or pass --dry-run)", file=sys.stderr)
        return 2
    if args.dry_run:
        os.environ["VLLM_QE_FORCE_TRITON"] = "1"  # the ops' Triton branch on CPU tensors
    if args.worker:
        return worker_main(args)
    if not args.out:
        p.error("--out is required")
    if args.jobs <= 0:
        args.jobs = min(2, os.cpu_count() or 1) if args.dry_run else max(1, min(8, (os.cpu_count() or 2) - 1))
    return correctness_main(args)


if __name__ == "__main__":
    sys.exit(main())
