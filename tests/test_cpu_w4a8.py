"""CPU W4A8 as real int8 x int4 (runtime/kernels.py `cpu_policy`): the choice on each kind of CPU, and the numerics
of vLLM's AMX kernel (`int4_scaled_mm_cpu`, through `VllmMPKernel`) against the format's reference."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from tests.helpers.amx import amx_usable
from tests.helpers.packed import random_packed_layer
from vllm_qe.format.module import dequantize_packed
from vllm_qe.kernels import reference
from vllm_qe.kernels.base import KernelTarget, QELayerSpec
from vllm_qe.runtime.kernels import choose_kernel, choose_kernel_class

AMX = frozenset({"amx", "avx512"})
ZEN = frozenset({"zen", "avx512"})
ZEN_ZENTORCH = frozenset({"zen", "zentorch", "avx512"})
INTEL_NO_AMX = frozenset({"avx512"})


def _spec(act_bits: int, in_f: int = 512, out_f: int = 256, symmetric: bool = True, in_p: int | None = None,
          dtype: torch.dtype = torch.bfloat16) -> QELayerSpec:
    return QELayerSpec.build(in_f, out_f, in_p or in_f, out_f, 4, 128, symmetric, act_bits, dtype)


@pytest.mark.parametrize("feats,act_bits,env,want", [
    (AMX, 8, {}, "VllmMPKernel"),  # int4_scaled_mm_cpu: the format's A8 numerics
    (AMX, 0, {}, "Int4PackCPUKernel"),  # W4A16 keeps its numerics and torch's int4 GEMM (decode)
    (AMX, 0, {"VLLM_QE_W4A16_AS_W4A8": "1"}, "VllmMPKernel"),  # vLLM's W4A16-as-W4A8, opt-in only
    (AMX, 6, {}, "Int4PackCPUKernel"),  # no int6 kernel: fake quantization + int4 GEMM
    (ZEN_ZENTORCH, 8, {}, "Int4PackCPUKernel"),  # zentorch rounds the token scale to bf16: not by default
    (ZEN_ZENTORCH, 8, {"VLLM_QE_ZENTORCH_W4A8": "1"}, "VllmMPKernel"),
    (ZEN_ZENTORCH, 0, {}, "Int4PackCPUKernel"),
    (ZEN, 8, {}, "Int4PackCPUKernel"),  # Zen without zentorch: today's path
    (INTEL_NO_AMX, 8, {}, "Int4PackCPUKernel"),
    (INTEL_NO_AMX, 0, {}, "Int4PackCPUKernel"),
])
def test_cpu_w4a8_choice_per_cpu(feats, act_bits, env, want, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: "amx" in feats)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    kind, reasons = choose_kernel_class(_spec(act_bits), KernelTarget("cpu", cpu_features=feats))
    assert kind.__name__ == want, reasons
    if feats == ZEN_ZENTORCH and want == "VllmMPKernel":
        from vllm_qe.runtime.kernels import vllm_choice

        assert vllm_choice(_spec(act_bits), KernelTarget("cpu", cpu_features=feats))[0].__name__ == \
            "ZentorchWNA16LinearKernel"


@pytest.mark.parametrize("kw,reason", [
    (dict(symmetric=False), "symmetric 4-bit"),
    (dict(in_f=1024, in_p=512), "row-parallel shard"),
    (dict(dtype=torch.float32), "bf16 activations only"),
])
def test_cpu_w4a8_refusals_name_the_reason(kw, reason, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    kind, reasons = choose_kernel_class(_spec(8, **kw), KernelTarget("cpu", cpu_features=AMX))
    assert kind.__name__ != "VllmMPKernel"
    assert reason in reasons[0], reasons


@pytest.mark.skipif(not amx_usable(), reason="needs an AMX CPU whose kernel grants AMX tile data (this machine: "
                                              "none)")
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
@pytest.mark.parametrize("smooth", [False, True])
def test_vllm_amx_w4a8_matches_the_formats_a8_reference(tokens, smooth):
    """Within bf16 output rounding of the format's A8 reference (per-token symmetric int8, float32 scale), and
    clearly closer to it than to the weight-only product (so a kernel that silently skipped activation
    quantization fails)."""
    import vllm.model_executor.parameter as vparam
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

    out_f, in_f = 256, 512
    packed, scale, _ = random_packed_layer(4, True, 128, out_f, in_f, seed=tokens)
    w = dequantize_packed(packed, scale, None, 4, 128, in_f)
    layer = torch.nn.Module()
    with mock.patch.object(vparam, "get_tensor_model_parallel_rank", return_value=0), \
            mock.patch.object(vparam, "get_tensor_model_parallel_world_size", return_value=1):
        layer.weight_packed = PackedvLLMParameter(data=packed.clone(), input_dim=1, output_dim=0, packed_dim=1,
                                                  packed_factor=8, weight_loader=None)
        layer.weight_scale = GroupQuantScaleParameter(data=scale.clone(), output_dim=0, input_dim=1,
                                                      weight_loader=None)
    layer.bias = None
    kernel = choose_kernel(_spec(8, in_f, out_f), KernelTarget("cpu"))
    assert kernel.name == "CPUWNA16LinearKernel(W4A8)" and kernel.fuses_act_quant
    kernel.process_weights_after_loading(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, in_f, generator=g)
    x[:, :4] *= 10  # outlier channels: per-token scales far from a per-tensor one
    s = torch.rand(in_f, generator=g) + 0.5 if smooth else None
    xb = x.bfloat16()
    got = kernel.forward(layer, xb, s, None).float()
    xs = xb.float() if s is None else (xb.float() / s).bfloat16().float()  # the kernel gets x / s in bf16
    want = reference.base_gemm(xs, w, None, 8).float()
    weight_only = reference.base_gemm(xs, w, None, None).float()
    err = ((got - want).norm() / want.norm()).item()
    err_a16 = ((got - weight_only).norm() / weight_only.norm()).item()
    assert err < 4e-3, err
    assert err_a16 > 3 * err, (err, err_a16)
