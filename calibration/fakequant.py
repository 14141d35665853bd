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
