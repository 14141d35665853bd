"""Base GEMM kernels of a QE linear layer, chosen once per layer at load (the shape of vLLM's `MPLinearKernel`).

A layer is described by vLLM's own `MPLinearLayerConfig` (the checkpoint's integer grid mapped onto vLLM's scalar
types: symmetric 4-bit -> `uint4b8`, asymmetric 4-bit -> `uint4` + zero points, 8-bit -> `uint8b128` / `uint8`)
plus what vLLM's config cannot say (3-bit / 2-bit grids, activation quantization). `choose_kernel` walks, in order:

1. `VllmMPKernel`: whatever `vllm...kernels.linear.choose_mp_linear_kernel` picks (CUDA: Machete, Marlin, ...;
   CPU: Dynamic4bit, Zentorch, CPUWNA16) for weight-only layers (on CPU also activation-quantized ones, whose
   fake quantization runs in torch before the GEMM). On CPU, CPUWNA16 is taken only with AMX: its generic path
   is ~30x slower than torch's int4 GEMM at decode sizes (measured; `VLLM_QE_CPU_KERNEL=vllm` takes it anyway). The checkpoint's tensors are already compressed-tensors'
   layout (`weight_packed` `[out, in/8]` int32, little-endian nibbles), so they are handed to vLLM as they are;
   only the zero points are repacked (uint8 `[out, G]` -> int32 `[out/8, G]`) and the scales cast to the
   activation dtype.
2. `Int4PackCPUKernel` (own, CPU): weights stay packed in torch's int4 layout (0.5 byte per weight), 2/3/4-bit
   grids held in 4 bits, any activation dtype. One opaque op (`vllm_qe::int4pack_linear`) picks by token count at
   run time: torch's `_weight_int4pack_mm_for_cpu` (a decode kernel) below `INT4_DEQUANT_MIN_TOKENS`, else the
   packed bytes dequantized in column chunks + the dense GEMM (prefill).
3. `TritonGemmKernel` (own, CUDA): the project's Triton GEMM reading the checkpoint's bitstream (3-bit, fused
   A4/A6/A8 activation quantization, shapes vLLM rejects).
4. `ReferenceKernel` (last resort): keeps the packed tensors and dequantizes per call; never a resident
   full-precision copy.

`choose_kernel(spec, KernelTarget("cuda", 90))` evaluates the CUDA choice on any machine (vLLM's chooser runs
against a CUDA platform view of the given capability), which is how the CPU tests check it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import MPLinearKernel, MPLinearLayerConfig
from vllm.model_executor.parameter import PackedvLLMParameter
from vllm.scalar_type import ScalarType, scalar_types

from vllm_qe.format import spec
from vllm_qe.format.packing import pack, unpack
from vllm_qe.format.quantizer import fake_quantize_activation
from vllm_qe.kernels import ops

logger = init_logger("vllm.plugins.vllm_qe")  # under the "vllm" logger, which vLLM configures

INT4PACK_GROUPS = (256, 128, 64, 32)  # group sizes `_weight_int4pack_mm_for_cpu` accepts, largest first


def vllm_weight_type(bits: int, symmetric: bool) -> ScalarType | None:
    """vLLM scalar type of the checkpoint's grid (`w = (q - z)·s`, `q` in `[0, 2^bits)`), or None when vLLM has no
    packed layout equal to the format's bitstream (3-bit values straddle int32 words; 2-bit: no vLLM kernel)."""
    return {(4, True): scalar_types.uint4b8, (4, False): scalar_types.uint4,
            (8, True): scalar_types.uint8b128, (8, False): scalar_types.uint8}.get((bits, symmetric))


@dataclass(frozen=True)
class KernelTarget:
    """Where the layer runs: `device` "cpu" or "cuda"; `capability` the CUDA compute capability as `10*major +
    minor` (None: the current device's)."""

    device: str
    capability: int | None = None

    @classmethod
    def of(cls, t: torch.Tensor) -> KernelTarget:
        return cls("cuda" if t.is_cuda else "cpu")


@dataclass
class QELayerSpec:
    """What fixes a layer's base GEMM: vLLM's `MPLinearLayerConfig` (shapes `[in, out]` full and per partition,
    weight scalar type, activation dtype, group size, zero points) and the format's `bits` / `symmetric` grid and
    `act_bits` (0 = weight-only)."""

    mp: MPLinearLayerConfig
    bits: int
    symmetric: bool
    act_bits: int = 0

    @classmethod
    def build(cls, in_full: int, out_full: int, in_p: int, out_p: int, bits: int, group_size: int,
              symmetric: bool, act_bits: int, act_dtype: torch.dtype) -> QELayerSpec:
        wtype = vllm_weight_type(bits, symmetric)
        if wtype is None:  # a placeholder for grids vLLM lacks (`vllm_choice` rejects them by `bits`)
            wtype = scalar_types.uint4
        mp = MPLinearLayerConfig(full_weight_shape=(in_full, out_full), partition_weight_shape=(in_p, out_p),
                                 weight_type=wtype, act_type=act_dtype, group_size=group_size,
                                 zero_points=not symmetric)
        return cls(mp, bits, symmetric, act_bits)

    @property
    def in_p(self) -> int:
        return self.mp.partition_weight_shape[0]

    @property
    def out_p(self) -> int:
        return self.mp.partition_weight_shape[1]

    @property
    def group_size(self) -> int:
        return self.mp.group_size

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        a = f"A{self.act_bits}" if self.act_bits else "A16"
        return f"W{self.bits}{a} {g} {'sym' if self.symmetric else 'asym'} {str(self.mp.act_type)[6:]}"


class QEGemmKernel(ABC):
    """One base GEMM `y = Q_act(x / s) · Ŵᵀ` (`[T, in]` -> `[T, out]`, `x.dtype`) over a layer's checkpoint tensors
    `weight_packed` / `weight_scale` / `weight_zero_point` (repacked once in `process_weights_after_loading`)."""

    vllm_backed: ClassVar[bool] = False

    def __init__(self, c: QELayerSpec) -> None:
        self.c = c

    @classmethod
    @abstractmethod
    def can_implement(cls, c: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        raise NotImplementedError

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Base GEMM on already smoothed / activation-quantized `x` `[T, in]`."""
        raise NotImplementedError

    def forward(self, layer: torch.nn.Module, x: torch.Tensor, smooth: torch.Tensor | None,
                act_absmax: torch.Tensor | None) -> torch.Tensor:
        """Smoothing and per-token activation fake quantization in torch (float32 math, as the reference), then
        the base GEMM in `x.dtype`. Kernels that fuse them override this."""
        if smooth is None and not self.c.act_bits:
            return self.apply(layer, x)
        xs = x.float() if smooth is None else x.float() / smooth
        if self.c.act_bits:
            xs = fake_quantize_activation(xs, self.c.act_bits, act_absmax)
        return self.apply(layer, xs.to(x.dtype))


# -- 1. vLLM's mixed-precision kernels -----------------------------------------------------------------------------
class VllmMPKernel(QEGemmKernel):
    """vLLM's own choice (`choose_mp_linear_kernel`) on the checkpoint's tensors (compressed-tensors layout)."""

    vllm_backed = True

    def __init__(self, c: QELayerSpec, target: KernelTarget | None = None) -> None:
        super().__init__(c)
        kind, why = vllm_choice(c, target or KernelTarget("cpu"))
        if kind is None:
            raise ValueError(why)
        self.inner: MPLinearKernel = kind(c.mp, spec.WEIGHT_PACKED, spec.WEIGHT_SCALE, spec.WEIGHT_ZERO)

    @property
    def name(self) -> str:
        return type(self.inner).__name__

    @classmethod
    def can_implement(cls, c: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        kind, why = vllm_choice(c, target)
        return (kind is not None), why

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        dtype = self.c.mp.act_type
        layer.weight_scale.data = layer.weight_scale.data.to(dtype)
        zero = getattr(layer, spec.WEIGHT_ZERO, None)
        if zero is not None:  # uint8 [out, G] -> compressed-tensors int32 [out / (32/bits), G], packed along out
            bits = self.c.bits
            packed = pack(zero.data.to(torch.int32).t().contiguous(), bits).t().contiguous()
            delattr(layer, spec.WEIGHT_ZERO)
            layer.register_parameter(spec.WEIGHT_ZERO, PackedvLLMParameter(
                data=packed, input_dim=1, output_dim=0, packed_dim=0, packed_factor=32 // bits,
                weight_loader=_no_loader))
        self.inner.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.inner.apply_weights(layer, x, None)


def _no_loader(*args, **kwargs) -> None:
    raise RuntimeError("vllm-qe: repacked parameters are not reloadable")


_CPU_HALF_ONLY = {"CPUWNA16LinearKernel", "ZentorchWNA16LinearKernel"}


def vllm_choice(c: QELayerSpec, target: KernelTarget) -> tuple[type[MPLinearKernel] | None, str | None]:
    """vLLM's kernel class for this layer on `target`, or None and why not."""
    if vllm_weight_type(c.bits, c.symmetric) is None:
        return None, f"vLLM has no {c.bits}-bit {'sym' if c.symmetric else 'asym'} weight type"
    if target.device == "cuda" and c.act_bits:
        return None, f"A{c.act_bits}: activation quantization is fused only in the own Triton GEMM"
    if c.group_size != -1 and c.in_p % c.group_size:
        return None, f"input size per partition {c.in_p} is not a multiple of group_size {c.group_size}"
    from vllm.model_executor.kernels.linear import choose_mp_linear_kernel

    try:
        with _platform_view(target):
            kind = choose_mp_linear_kernel(c.mp, target.capability)
    except ValueError as e:
        return None, str(e).splitlines()[0]
    if target.device == "cpu" and kind.__name__ in _CPU_HALF_ONLY and c.mp.act_type == torch.float32:
        # vLLM's `can_implement` accepts float32, but `cpu_gemm_wna16` has no float32 path (measured).
        return None, f"{kind.__name__} runs bf16/fp16 activations only"
    if (target.device == "cpu" and kind.__name__ == "CPUWNA16LinearKernel" and not torch.cpu._is_amx_tile_supported()
            and os.environ.get("VLLM_QE_CPU_KERNEL") != "vllm"):
        # Without AMX (off in every vLLM process here, see plugin.py) `cpu_gemm_wna16` runs its generic "vec" path:
        # 30 ms vs 0.9 ms for torch's int4 GEMM at M=1, 1536x8960 g128, one thread (benchmarks/cpu_serving.py).
        return None, "CPUWNA16 without AMX (generic path, measured ~30x slower than torch's int4 GEMM at M=1; " \
                     "VLLM_QE_CPU_KERNEL=vllm keeps it)"
    return kind, None


@contextlib.contextmanager
def _platform_view(target: KernelTarget):
    """Run vLLM's chooser as if on `target` (a CUDA device of `target.capability` on any host): patches
    `current_platform` in vLLM's kernel-selection modules. A no-op when `target` is where we run."""
    from vllm.platforms import current_platform

    here = "cuda" if current_platform.is_cuda() else "cpu" if current_platform.is_cpu() else "other"
    if target.device == here and target.capability is None:
        yield
        return
    if target.device != "cuda" or target.capability is None:
        raise ValueError(f"cannot evaluate kernels for {target} on a {here} host (give a CUDA capability)")
    view = _cuda_platform(target.capability)
    mods = [m for n, m in list(sys.modules.items()) if m is not None and (
        n.startswith("vllm.model_executor.kernels.linear") or n.startswith("vllm.model_executor.layers.quantization.utils"))
        and getattr(m, "current_platform", None) is current_platform]
    for m in mods:
        m.current_platform = view
    try:
        yield
    finally:
        for m in mods:
            m.current_platform = current_platform


def _cuda_platform(capability: int):
    from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum

    class CudaCapabilityView(Platform):
        _enum = PlatformEnum.CUDA
        device_name = "cuda"
        device_type = "cuda"

        @classmethod
        def get_device_capability(cls, device_id: int = 0) -> DeviceCapability:
            return DeviceCapability(capability // 10, capability % 10)

    return CudaCapabilityView()


# -- 2. torch's CPU int4 GEMM ----------------------------------------------------------------------------------------
class Int4PackCPUKernel(QEGemmKernel):
    """torch's CPU int4 layout, run by `int4pack_linear` (int4 GEMM or dequantize + GEMM by token count): weight
    `[out, in/2]` uint8 (two 4-bit values per byte, torch's layout) and `[G', out, 2]` (scale, offset) in the
    activation dtype, where torch computes `w = (q - 8)·s + o`.
    The format's `w = (q - z)·s` maps exactly with `o = (8 - z)·s` (exact in float32: both products are multiples
    of the float16 scale's last bit); 2/3-bit values are held in 4 bits. Groups of 16 (or per-channel rows that
    no accepted group divides) are rejected; a group that is a multiple of an accepted size repeats its scale."""

    @classmethod
    def can_implement(cls, c: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        if target.device != "cpu":
            return False, "CPU only"
        if c.bits > 4:
            return False, f"{c.bits}-bit values do not fit torch's int4 layout"
        if c.mp.act_type not in (torch.bfloat16, torch.float16, torch.float32):
            return False, f"activation dtype {c.mp.act_type}"
        if c.out_p % 16:
            return False, f"output size per partition {c.out_p} is not a multiple of 16"
        if int4pack_group(c) is None:
            return False, f"group_size {c.group_size} with input size {c.in_p}: no group size in {INT4PACK_GROUPS}"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w, sz = int4pack(layer.weight_packed.data, layer.weight_scale.data, _zero_data(layer), self.c)
        _drop_checkpoint_tensors(layer)
        layer.qe_w4 = torch.nn.Parameter(w, requires_grad=False)
        layer.qe_w4_sz = torch.nn.Parameter(sz, requires_grad=False)
        layer.qe_w4_group = int4pack_group(self.c)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.to(layer.qe_w4_sz.dtype).contiguous()
        return torch.ops.vllm_qe.int4pack_linear(x, layer.qe_w4, layer.qe_w4_group, layer.qe_w4_sz)


def int4pack_group(c: QELayerSpec) -> int | None:
    g = c.in_p if c.group_size == -1 else c.group_size
    return next((a for a in INT4PACK_GROUPS if g % a == 0 and c.in_p % a == 0), None)


def int4pack(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, c: QELayerSpec
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint tensors (`packed` `[out, words]`, `scale` `[out, G]` fp16, `zero` `[out, G]` uint8 or None) ->
    torch's CPU int4 weight `[out, in/2]` uint8 and scale/offset `[in/g', out, 2]` in `c.mp.act_type`."""
    in_f, g = c.in_p, int4pack_group(c)
    q = unpack(packed, c.bits, in_f)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    s = scale.float()
    z = torch.full_like(s, 2 ** (c.bits - 1)) if zero is None else zero.float()
    groups = torch.arange(in_f // g) * g // (in_f if c.group_size == -1 else c.group_size)
    s, z = s[:, groups], z[:, groups]
    sz = torch.stack([s.t(), ((8 - z) * s).t()], dim=-1).contiguous().to(c.mp.act_type)
    return w, sz


# -- M-dependent CPU dispatch on torch's int4 layout -------------------------------------------------------------------
# torch's int4 GEMM re-dequantizes the weight for every block of 4 rows, so its cost grows linearly with the tokens
# (1536x8960 g128, bf16, 1 thread: ~0.3-0.6 ms per token), while dequantizing the weight once (`int4pack_dequantize`,
# vectorized torch ops: ~12-24 ms for those 13.8 M weights) and calling the dense GEMM (oneDNN) costs about the same at
# any size up to ~100 tokens. Measured on the project's 2-core machine under load (`benchmarks/cpu_serving.py`'s base
# GEMM table, same run: int4 vs dequant + GEMM): 32 tokens 17-20 vs 25-27 ms, 64 tokens 39 vs 28-33 ms, 128 tokens
# 77-83 vs 30-46 ms, so the crossover is ~48 tokens. The rule is per call (per expert in the MoE op).
INT4_DEQUANT_MIN_TOKENS = int(os.environ.get("VLLM_QE_INT4_DEQUANT_MIN_TOKENS", "48"))
DEQUANT_CHUNK_ELEMS = 1 << 21  # weights dequantized per chunk of output columns (4 MiB in bf16): bounded temporaries


@functools.cache
def int4pack_layout() -> tuple[int, str] | None:
    """How `_convert_weight_to_int4pack_for_cpu` lays out nibbles on this CPU (torch 2.13, int4mm_kernel.cpp): the
    `[N, K]` grid is cut into blocks of `block_n` output rows, each stored as `[K, block_n/2]` bytes. In a full
    block byte `j` holds row `j` (low nibble) and row `j + block_n/2` (high nibble) ("halves": AVX512 with block 64,
    AVX2 with block 32) or rows `2j` / `2j+1` ("pairs": unvectorized build, block 32); a last partial block (16,
    32 or 48 rows) is always "pairs". The layout follows torch's dispatch CPU capability, so it is probed once on a
    small grid; None if no known layout reproduces it (then the int4 GEMM runs at every size)."""
    for layout in ((64, "halves"), (32, "halves"), (32, "pairs")):
        n, k = 2 * layout[0] + 16, 64
        q = (torch.arange(n * k, dtype=torch.int32).view(n, k) * 7 + torch.arange(n, dtype=torch.int32)[:, None]) % 16
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        sz = torch.stack([torch.ones(1, n), torch.full((1, n), 8.0)], dim=-1)  # w = (q - 8)·1 + 8 = q
        if torch.equal(int4pack_dequantize(w4, sz, k, 0, n, layout), q.t().float()):
            return layout
    return None


def int4pack_dequantize(w4: torch.Tensor, sz: torch.Tensor, group: int, n0: int, n1: int,
                        layout: tuple[int, str]) -> torch.Tensor:
    """Output rows `[n0, n1)` of a torch int4pack weight (`w4` `[N, K/2]` uint8, `sz` `[K/group, N, 2]` (scale,
    offset) in the activation dtype) dequantized as torch's kernel does, `w = (q - 8)·s + o`, one rounding to
    `sz.dtype`; returned transposed, `[K, n1 - n0]` (the GEMM's `[K, N]` operand). `n0` is a multiple of the block.
    Vectorized torch ops on whole blocks: nibbles -> int8 `q - 8` -> `sz.dtype` (with the block's row permutation)
    -> one `addcmul` with the group's scale and offset."""
    block, kind = layout
    N, K = w4.shape[0], w4.shape[1] * 2
    full = N // block * block
    flat = w4.view(-1)
    w = torch.empty(K, n1 - n0, dtype=sz.dtype, device=w4.device)
    for a, b in ((n0, min(n1, full)), (max(n0, full), n1)):  # whole blocks, then the partial last block
        if a >= b:
            continue
        nb = block if a < full else b - a
        src = flat[a * K // 2:b * K // 2].view(-1, K, nb // 2)  # [blocks, K, nb/2]
        lo = (src & 15).view(torch.int8).sub_(8).permute(1, 0, 2)
        hi = (src >> 4).view(torch.int8).sub_(8).permute(1, 0, 2)
        dst = w[:, a - n0:b - n0]
        if kind == "halves" and a < full:
            dst = dst.view(K, -1, 2, nb // 2)
            dst[:, :, 0].copy_(lo)
            dst[:, :, 1].copy_(hi)
        else:
            dst = dst.view(K, -1, nb // 2, 2)
            dst[..., 0].copy_(lo)
            dst[..., 1].copy_(hi)
    wg = w.view(K // group, group, n1 - n0)
    s, o = sz[:, n0:n1, 0].contiguous().unsqueeze(1), sz[:, n0:n1, 1].contiguous().unsqueeze(1)
    torch.addcmul(o, wg, s, out=wg)
    return w


def int4pack_mm(x: torch.Tensor, w4: torch.Tensor, group: int, sz: torch.Tensor,
                min_tokens: int | None = None) -> torch.Tensor:
    """`x` `[T, K]` (in `sz.dtype`) times a torch int4pack weight -> `[T, N]`: torch's int4 GEMM below `min_tokens`
    tokens (default `INT4_DEQUANT_MIN_TOKENS`; float32: never), else the weight dequantized in chunks of output columns
    (`DEQUANT_CHUNK_ELEMS` weights each, so the temporary stays bounded) and the dense GEMM (oneDNN)."""
    layout = int4pack_layout()
    if min_tokens is None:  # float32: torch's int4 GEMM is slower at every size (1 token: 57 vs 31 ms, same run)
        min_tokens = 1 if sz.dtype == torch.float32 else INT4_DEQUANT_MIN_TOKENS
    if x.shape[0] < min_tokens or layout is None:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, group, sz)
    N, K = w4.shape[0], w4.shape[1] * 2
    step = max(layout[0], DEQUANT_CHUNK_ELEMS // K // layout[0] * layout[0])
    outs = [x @ int4pack_dequantize(w4, sz, group, n0, min(N, n0 + step), layout) for n0 in range(0, N, step)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@torch.library.custom_op("vllm_qe::int4pack_linear", mutates_args=())
def int4pack_linear(x: torch.Tensor, w4: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """`int4pack_mm` as one opaque op: the token-count branch happens at run time, so vLLM's compiled graph (dynamic
    token dimension) neither specializes nor guards on it."""
    return int4pack_mm(x, w4, group, sz)


@int4pack_linear.register_fake
def _(x, w4, group, sz):
    return x.new_empty(x.shape[0], w4.shape[0])


# -- 3./4. the project's Triton GEMM (CUDA) and the per-call dequantizing reference -----------------------------------
class _PackedOpKernel(QEGemmKernel):
    """The `vllm_qe::qe_gemm_packed` op on the checkpoint's own tensors; smoothing and activation quantization fused."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        pass

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.forward(layer, x, None, None)

    def forward(self, layer: torch.nn.Module, x: torch.Tensor, smooth: torch.Tensor | None,
                act_absmax: torch.Tensor | None) -> torch.Tensor:
        return ops.qe_gemm_packed(x, layer.weight_packed, layer.weight_scale, _zero_data(layer), self.c.bits,
                                  self.c.group_size, smooth, self.c.act_bits, act_absmax)


class TritonGemmKernel(_PackedOpKernel):
    """kernels/triton/gemm.py `qe_gemm`: in-kernel dequantization of the bitstream (any bits), fused activation
    quantization. Not runnable on this project's CPU machines (no GPU); its numerics are tested with the
    Triton interpreter."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Scales and zero points to the N-major layout once (`gemm.kernel_layout`: same values and shape, N
        unit-stride), so a tile's per-group scale loads are contiguous (vectorized: docs/benchmarks/static-sm90.md)."""
        from vllm_qe.kernels.triton.gemm import kernel_layout

        scale, zero = kernel_layout(layer.weight_scale.data, _zero_data(layer))
        layer.weight_scale.data = scale
        if zero is not None:
            getattr(layer, spec.WEIGHT_ZERO).data = zero

    @classmethod
    def can_implement(cls, c: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        if target.device != "cuda":
            return False, "CUDA only"
        if c.mp.act_type not in (torch.float16, torch.bfloat16, torch.float32):
            return False, f"activation dtype {c.mp.act_type}"
        return True, None


class ReferenceKernel(_PackedOpKernel):
    """Last resort: dequantizes the packed weight to float32 on every call (never kept)."""

    @classmethod
    def can_implement(cls, c: QELayerSpec, target: KernelTarget) -> tuple[bool, str | None]:
        return True, None


KERNELS: dict[str, list[type[QEGemmKernel]]] = {
    "cpu": [VllmMPKernel, Int4PackCPUKernel, ReferenceKernel],
    "cuda": [VllmMPKernel, TritonGemmKernel, ReferenceKernel],
}


def choose_kernel_class(c: QELayerSpec, target: KernelTarget) -> tuple[type[QEGemmKernel], list[str]]:
    """The first kernel class in `KERNELS[target.device]` that implements `c`, and why the earlier ones did not."""
    reasons = []
    for kind in KERNELS[target.device]:
        ok, why = kind.can_implement(c, target)
        if ok:
            return kind, reasons
        reasons.append(f"{kind.__name__}: {why}")
    raise AssertionError("ReferenceKernel implements every layer")


def choose_kernel(c: QELayerSpec, target: KernelTarget) -> QEGemmKernel:
    kind, _ = choose_kernel_class(c, target)
    return kind(c, target) if kind is VllmMPKernel else kind(c)


_LOGGED: set[tuple[str, str, str]] = set()


def log_choice(layer_kind: str, kernel: QEGemmKernel, c: QELayerSpec) -> None:
    """Log the chosen kernel once per (layer kind, kernel, scheme)."""
    key = (layer_kind, kernel.name, c.describe())
    if key not in _LOGGED:
        _LOGGED.add(key)
        src = "vLLM" if kernel.vllm_backed else "vllm-qe"
        logger.info("vllm-qe: %s layers (%s) -> %s (%s)", layer_kind, c.describe(), kernel.name, src)


def _zero_data(layer: torch.nn.Module) -> torch.Tensor | None:
    z = getattr(layer, spec.WEIGHT_ZERO, None)
    return None if z is None else z.data


def _drop_checkpoint_tensors(layer: torch.nn.Module, prefix: str = "") -> None:
    for suffix in (spec.WEIGHT_PACKED, spec.WEIGHT_SCALE, spec.WEIGHT_ZERO):
        if hasattr(layer, prefix + suffix):
            delattr(layer, prefix + suffix)
