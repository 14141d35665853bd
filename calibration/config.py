"""`CalibrationConfig`: what a calibration should do (the `vllm-qe calibrate` flags, one field each)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_qe.calibration.data import BUILTIN
from vllm_qe.format.quantizer import DEFAULT_CLIP


@dataclass
class CalibrationConfig:
    """What to do. `abits=None` is weight-only (A16); `group_size=-1` is per-channel."""

    method: str = "rtn"
    wbits: int = 4
    abits: int | None = None
    group_size: int = 128
    symmetric: bool = False
    calib: str = BUILTIN
    num_samples: int = 32
    seed: int = 0
    quantize_vision: bool = True
    quantize_language: bool = True
    ignore: list[str] = field(default_factory=list)
    propagate: str = "quantized"
    token_importance: str | None = None  # TLQ: None | "gradnorm" | "first_order"
    # TLQ: a token's weight is (1 - mix) + mix * its normalised importance (gradients.mix_token_weights)
    token_importance_mix: float = 0.5
    method_params: dict[str, Any] = field(default_factory=dict)
    clip: str = DEFAULT_CLIP  # weight group ranges of every quantizer: minmax | mse (per-group searched clipping)
    offload: bool = False  # stream block weights from safetensors; calibrated blocks live on disk (streaming.py)
    max_activation_mib: float | None = None  # one block's hidden states kept in memory; the rest spill to disk
