"""`FakeQuantLinear`: a drop-in nn.Module computing exactly what the vLLM runtime computes (torch reference)."""

from __future__ import annotations

import torch

from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.quantizer import dequantize
from vllm_qe.kernels import reference


class FakeQuantLinear(torch.nn.Module):
    """Replaces an nn.Linear after calibration; `forward` = the format's forward contract."""

    def __init__(self, q: QuantizedLinear, bias: torch.Tensor | None, act_bits: int | None) -> None:
        super().__init__()
        self.quantized = q
        self.act_bits = act_bits
        # Smoothed-space weight, dequantized exactly as the runtime does in process_weights_after_loading.
        self.register_buffer("weight_deq", dequantize(q.qweight, q.scale, q.zero, q.group_size), persistent=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantized
        x2 = x.reshape(-1, x.shape[-1])
        ids = None if q.router is None else reference.route(x2, q.router)[:, None]
        y = reference.qe_linear(
            x2, self.weight_deq, self.bias, act_bits=self.act_bits, smooth=q.smooth, shared_a=q.shared_a,
            shared_b=q.shared_b, routed_a=q.routed_a, routed_b=q.routed_b, expert_ids=ids,
        )
        return y.reshape(*x.shape[:-1], self.out_features)


def load_fake_quant_model(ckpt_dir, dtype: torch.dtype = torch.float32):
    """A transformers model of a vllm-qe checkpoint whose quantized linears are `FakeQuantLinear` (the reference
    of what vLLM serves). Non-quantized tensors load through transformers as usual."""
    import logging

    from transformers import AutoConfig, AutoModelForImageTextToText

    from vllm_qe.calibration.model_structure import checkpoint_names
    from vllm_qe.format.checkpoint import group_module_tensors, load_tensors, read_qe_config, validate_module

    qcfg = read_qe_config(ckpt_dir)
    config = AutoConfig.from_pretrained(str(ckpt_dir))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tf_logger = logging.getLogger("transformers.modeling_utils")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # quantized modules' `.weight` is absent by design
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(ckpt_dir), config=config, dtype=dtype).eval()
    finally:
        tf_logger.setLevel(level)
    tensors = load_tensors(ckpt_dir)
    grouped = group_module_tensors(set(tensors), qcfg.quantized_modules)
    replaced = set()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, disk in checkpoint_names(model, linears).items():
        if disk not in grouped:
            continue
        scheme = qcfg.module_scheme(disk)
        t = {s: tensors[n] for s, n in grouped[disk].items()}
        validate_module(disk, t, scheme)
        q = QuantizedLinear.from_tensors(t, scheme)
        bias = tensors.get(f"{disk}.bias")
        act = scheme.activation.bits if scheme.activation else None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FakeQuantLinear(q, bias, act))
        replaced.add(disk)
    replaced |= _load_fake_quant_experts(model, qcfg, tensors, grouped)
    missing = set(qcfg.quantized_modules) - replaced
    if missing:
        raise ValueError(f"{ckpt_dir}: quantized modules not found in the model: {sorted(missing)[:5]}")
    return model


def _load_fake_quant_experts(model, qcfg, tensors, grouped) -> set[str]:
    """Swap every fused-experts module whose per-expert modules are in the checkpoint for `FakeQuantExperts`."""
    from vllm_qe.calibration.model_structure import expert_checkpoint_names
    from vllm_qe.calibration.moe import FakeQuantExperts, group_expert_modules
    from vllm_qe.format.checkpoint import validate_module

    quantized: dict[str, QuantizedLinear] = {}
    replaced = set()
    for name, disk in expert_checkpoint_names(model).items():
        if disk not in grouped:
            continue
        scheme = qcfg.module_scheme(disk)
        t = {s: tensors[n] for s, n in grouped[disk].items()}
        validate_module(disk, t, scheme)
        quantized[name] = QuantizedLinear.from_tensors(t, scheme)
        replaced.add(disk)
    _, blocks = group_expert_modules(quantized)
    for path, per_expert in blocks.items():
        experts = model.get_submodule(path)
        n = experts.gate_up_proj.shape[0]
        if len(per_expert) != n:
            raise ValueError(f"{path}: the checkpoint has quantized modules for only some of its {n} experts")
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, FakeQuantExperts(per_expert, experts.act_fn))
    return replaced
