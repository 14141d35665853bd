"""Resident bytes of a served model's quantized layers (run inside vLLM's workers through `LLM.apply_model`)."""

from __future__ import annotations

from collections import Counter

import torch


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor `module` holds itself (parameters, buffers, tensor attributes; children excluded),
    each storage counted once."""
    seen: dict[int, int] = {}
    objs = list(module._parameters.values()) + list(module._buffers.values()) + list(vars(module).values())
    for t in (t for o in objs for t in _tensors(o)):
        if t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def bf16_bytes(module: torch.nn.Module) -> int:
    """What the layer's weights take in bf16 (this rank's partition): `2·out·in` (linear), `2·E·3·I·H` (MoE)."""
    if hasattr(module, "qe_dims"):
        E, H, ip = module.qe_dims
        return 2 * E * 3 * ip * H
    return 2 * module.qe_in * sum(module.qe_out_splits)


def quantized_layer_bytes(model: torch.nn.Module) -> dict:
    """`{"quantized": bytes, "bf16": bytes, "layers": n, "kernels": {kernel: count}}` over the layers served by
    vllm-qe's linear and MoE methods (adapters, routers, smoothing vectors included)."""
    from vllm_qe.runtime.linear import QELinearMethod
    from vllm_qe.runtime.moe import QEMoEMethod

    total, ref, kernels = 0, 0, Counter()
    for m in model.modules():
        method = getattr(m, "quant_method", None)
        if isinstance(method, (QELinearMethod, QEMoEMethod)):
            total += module_bytes(m)
            ref += bf16_bytes(m)
            kernels[method.kernel if isinstance(method.kernel, str) else method.kernel.name] += 1
    return {"quantized": total, "bf16": ref, "layers": sum(kernels.values()), "kernels": dict(kernels)}


def weight_report(model: torch.nn.Module) -> dict:
    """For benchmarks (`LLM.apply_model`, in the worker): bytes of every linear layer by name, of the plugin's
    quantized layers by name (with their bf16 size), the whole model's parameters and buffers, the
    quantized-layer summary, and the worker's peak RSS (KiB)."""
    import resource

    from vllm.model_executor.layers.linear import LinearBase

    from vllm_qe.runtime.linear import QELinearMethod

    linear = {n: module_bytes(m) for n, m in model.named_modules() if isinstance(m, LinearBase)}
    quant = {n: (module_bytes(m), bf16_bytes(m)) for n, m in model.named_modules()
             if isinstance(getattr(m, "quant_method", None), QELinearMethod)}
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return {"linear": linear, "quantized": quant, "summary": quantized_layer_bytes(model),
            "model_bytes": sum(seen.values()), "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
