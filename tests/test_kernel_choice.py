"""Which base GEMM each layer gets (runtime/kernels.py), for CUDA capabilities on this CPU machine and for CPU."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.packed import random_packed_layer
from vllm_qe.runtime.kernels import KernelTarget, QELayerSpec, choose_kernel_class, vllm_weight_type


def _spec(bits: int, act_bits: int = 0, symmetric: bool = True, group: int = 128, dtype=torch.bfloat16,
          shape: tuple[int, int] = (2048, 4096)) -> QELayerSpec:
    k, n = shape
    return QELayerSpec.build(k, n, k, n, bits, group, symmetric, act_bits, dtype)


def test_grid_maps_onto_vllm_scalar_types():
    assert str(vllm_weight_type(4, True)) == "uint4b8"
    assert str(vllm_weight_type(4, False)) == "uint4"
    assert str(vllm_weight_type(8, True)) == "uint8b128"
    assert vllm_weight_type(3, True) is None


@pytest.mark.parametrize("capability, bits, sym, dtype, want", [
    (90, 4, True, torch.bfloat16, "MacheteLinearKernel"),
    (90, 4, False, torch.float16, "MacheteLinearKernel"),
    (80, 4, True, torch.bfloat16, "MarlinLinearKernel"),
    (80, 4, False, torch.float16, "MarlinLinearKernel"),
    (90, 8, True, torch.bfloat16, "MacheteLinearKernel"),
    (80, 8, True, torch.float16, "MarlinLinearKernel"),
])
def test_cuda_weight_only_uses_vllms_machete_or_marlin(capability, bits, sym, dtype, want):
    from vllm_qe.runtime.kernels import vllm_choice

    spec = _spec(bits, symmetric=sym, dtype=dtype)
    kind, _ = choose_kernel_class(spec, KernelTarget("cuda", capability))
    assert kind.__name__ == "VllmMPKernel"
    chosen, _ = vllm_choice(spec, KernelTarget("cuda", capability))
    assert chosen.__name__ == want


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("bits, act_bits", [(3, 0), (4, 8), (4, 6), (2, 0)])
def test_cuda_own_triton_gemm_where_vllm_has_none(capability, bits, act_bits):
    kind, reasons = choose_kernel_class(_spec(bits, act_bits), KernelTarget("cuda", capability))
    assert kind.__name__ == "TritonGemmKernel", reasons
    assert reasons and reasons[0].startswith("VllmMPKernel")


@pytest.mark.parametrize("spec_kw, want", [
    (dict(bits=4), "Int4PackCPUKernel"),  # vLLM's CPUWNA16 without AMX is the slow generic path
    (dict(bits=4, act_bits=8), "Int4PackCPUKernel"),
    (dict(bits=4, dtype=torch.float32), "Int4PackCPUKernel"),  # cpu_gemm_wna16 has no float32 path
    (dict(bits=3), "Int4PackCPUKernel"),
    (dict(bits=2, symmetric=False), "Int4PackCPUKernel"),
    (dict(bits=4, group=16, dtype=torch.float32), "ReferenceKernel"),  # torch's int4 GEMM: groups >= 32
    (dict(bits=8, dtype=torch.float32), "ReferenceKernel"),
    (dict(bits=4, shape=(2048, 100), dtype=torch.float32), "ReferenceKernel"),  # out % 16
])
def test_cpu_choice(spec_kw, want, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # as in every vLLM process here
    kind, reasons = choose_kernel_class(_spec(**spec_kw), KernelTarget("cpu"))
    assert kind.__name__ == want, reasons


@pytest.mark.parametrize("spec_kw", [dict(bits=4), dict(bits=4, act_bits=8), dict(bits=4, symmetric=False)])
def test_cpu_choice_takes_vllms_cpuwna16_when_asked(spec_kw, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setenv("VLLM_QE_CPU_KERNEL", "vllm")
    from vllm_qe.runtime.kernels import vllm_choice

    kind, reasons = choose_kernel_class(_spec(**spec_kw), KernelTarget("cpu"))
    assert kind.__name__ == "VllmMPKernel", reasons
    assert vllm_choice(_spec(**spec_kw), KernelTarget("cpu"))[0].__name__ == "CPUWNA16LinearKernel"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, -1])
def test_int4pack_holds_the_checkpoint_grid_exactly(bits, symmetric, group):
    """torch's CPU int4 layout reproduces `dequantize_packed` bit for bit in float32 (identity input)."""
    from vllm_qe.format.module import dequantize_packed
    from vllm_qe.kernels.int4pack_cpu import Int4PackCPUKernel, int4pack

    out_f, in_f = 48, 192
    packed, scale, zero = random_packed_layer(bits, symmetric, group, out_f, in_f, seed=bits)
    c = QELayerSpec.build(in_f, out_f, in_f, out_f, bits, group, symmetric, 0, torch.float32)
    assert Int4PackCPUKernel.can_implement(c, KernelTarget("cpu"))[0]
    w4, sz = int4pack(packed, scale, zero, c)
    assert w4.dtype == torch.uint8 and w4.numel() == out_f * in_f // 2  # 4 bits per weight
    from vllm_qe.kernels.int4pack_cpu import int4pack_group

    got = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(in_f), w4, int4pack_group(c), sz)
    want = dequantize_packed(packed, scale, zero, bits, group, in_f)
    assert torch.equal(got.t(), want)


def test_masked_routed_adapters_equal_punica_and_the_reference():
    from vllm_qe.kernels.adapters import routed_masked, routed_punica
    from vllm_qe.kernels.reference import routed_lowrank

    g = torch.Generator().manual_seed(0)
    T, K, N, E, r = 23, 64, 40, 4, 8
    x, a, b = torch.randn(T, K, generator=g), torch.randn(E, r, K, generator=g), torch.randn(E, N, r, generator=g)
    ids = torch.randint(0, E, (T,), generator=g)
    want = routed_lowrank(x, a, b, ids)
    masked = routed_masked(x, a.reshape(E * r, K), b.permute(1, 0, 2).reshape(N, E * r), ids, E)
    torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed_punica(x, a, b, ids), want, rtol=1e-5, atol=1e-5)


# Triton reads TRITON_INTERPRET when its kernels are defined, so setting it inside the test is too late
@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (scripts/test.sh sets it)")
@pytest.mark.parametrize("symmetric", [True, False])
def test_triton_kernel_loads_scales_n_major_and_still_matches_the_reference(symmetric, monkeypatch):
    """TritonGemmKernel makes the scales / zero points N-major once at load (vectorized scale loads) and its output
    is unchanged: the Triton GEMM (interpreter, forced onto CPU tensors) equals the per-call reference."""
    from vllm_qe.kernels.packed import ReferenceKernel, TritonGemmKernel

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k, n, group = 128, 64, 32
    c = _spec(4, symmetric=symmetric, group=group, dtype=torch.float32, shape=(k, n))

    def layer() -> torch.nn.Module:
        m = torch.nn.Module()
        for name, t in zip(("weight_packed", "weight_scale", "weight_zero_point"),
                           random_packed_layer(4, symmetric, group, n, k, seed=1)):
            if t is not None:
                setattr(m, name, torch.nn.Parameter(t, requires_grad=False))
        return m

    x = torch.randn(5, k, generator=torch.Generator().manual_seed(0))
    ref_layer, tri_layer = layer(), layer()
    ReferenceKernel(c).process_weights_after_loading(ref_layer)
    tri = TritonGemmKernel(c)
    tri.process_weights_after_loading(tri_layer)
    assert tri_layer.weight_scale.stride() == (1, n)  # N-major
    assert torch.equal(tri_layer.weight_scale, ref_layer.weight_scale)
    want = ReferenceKernel(c).apply(ref_layer, x)
    monkeypatch.setenv("VLLM_QE_FORCE_TRITON", "1")
    got = tri.apply(tri_layer, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,bits,group,want", [
    ("cpu", 4, 32, "Int4PackMoEKernel"),  # every expert in torch's int4 layout
    ("cpu", 3, 128, "Int4PackMoEKernel"),  # 3-bit held in 4
    ("cpu", 8, 32, "ReferenceMoEKernel"),  # 8-bit: per-call dequantization of the active experts
    ("cpu", 4, 16, "ReferenceMoEKernel"),  # groups torch's int4 GEMM rejects
    ("cuda", 4, 128, "TritonMoEKernel"),
])
def test_moe_experts_are_chosen_from_the_same_registry(device, bits, group, want):
    from vllm_qe.runtime.kernels import choose_moe_kernel_class

    dt = torch.bfloat16
    c13 = QELayerSpec.build(256, 2 * 96, 256, 2 * 96, bits, group, True, 0, dt)
    c2 = QELayerSpec.build(96, 256, 96, 256, bits, group, True, 0, dt)
    target = KernelTarget(device, 90 if device == "cuda" else None)
    kind, reasons = choose_moe_kernel_class(c13, c2, target)
    assert kind.__name__ == want, reasons
    if want == "ReferenceMoEKernel" and device == "cpu":
        assert reasons and reasons[0].startswith("Int4PackMoEKernel:"), reasons
