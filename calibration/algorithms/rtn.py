"""RTN: round-to-nearest with min-max group parameters (no calibration data)."""

from __future__ import annotations

import torch

from vllm_qe.calibration.algorithms.base import Algorithm, LinearTarget, register
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.quantizer import DEFAULT_CLIP, choose_qparams, quantize
from vllm_qe.format.spec import WeightScheme


def rtn_quantize(weight: torch.Tensor, scheme: WeightScheme, smooth: torch.Tensor | None = None,
                 clip: str = DEFAULT_CLIP) -> QuantizedLinear:
    """Quantize `weight` `[out, in]` (times `diag(smooth)` when given) by round-to-nearest, group ranges by
    `clip` (`quantizer.choose_qparams`)."""
    w = weight.float() if smooth is None else weight.float() * smooth.float()
    qp = choose_qparams(w, scheme.bits, scheme.group_size, scheme.symmetric, clip)
    return QuantizedLinear(quantize(w, qp), qp.scale, qp.zero, scheme.bits, scheme.group_size, scheme.symmetric,
                           smooth=None if smooth is None else smooth.float())


@register
class RTN(Algorithm):
    """Round-to-nearest, no parameters and no calibration data (the layer loop's small token sample only feeds
    the report's per-layer error)."""

    name = "rtn"

    def quantize_group(self, targets: list[LinearTarget]) -> dict[str, QuantizedLinear]:
        return {t.name: rtn_quantize(t.weight, t.scheme.weight, clip=self.clip) for t in targets}
