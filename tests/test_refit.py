"""Scale refit (calibration/algorithms/refit.py): the layer's calibration loss never rises, integers stay."""

from __future__ import annotations

import pytest
import torch

from vllm_qe.calibration.algorithms.gptq import gptq_quantize
from vllm_qe.calibration.algorithms.refit import refit_scales
from vllm_qe.calibration.algorithms.rtn import rtn_quantize
from vllm_qe.format.spec import WeightScheme


def _layer(out_f: int = 64, in_f: int = 256, n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs with a few large channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g) @ (torch.eye(in_f) + torch.randn(in_f, in_f, generator=g) / in_f**0.5)
    x[:, :4] *= 16
    return torch.randn(out_f, in_f, generator=g) * 0.05, (x.T @ x / n).double()


def _loss(w: torch.Tensor, q, h: torch.Tensor) -> torch.Tensor:
    """float64 `[out]`: each row's loss `(W_r − Ŵ_r) H (W_r − Ŵ_r)ᵀ`, computed directly (not from refit.py's terms)."""
    e = w.double() - q.dequantized_weight().double()
    return ((e @ h) * e).sum(dim=1)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (3, 64), (4, -1)])
@pytest.mark.parametrize("quantizer", ["gptq", "rtn"])
def test_refit_never_raises_a_rows_loss_and_keeps_the_integers(symmetric: bool, bits: int, group_size: int,
                                                               quantizer: str) -> None:
    w, h = _layer()
    scheme = WeightScheme(bits, group_size, symmetric)
    q = gptq_quantize(w, h, scheme) if quantizer == "gptq" else rtn_quantize(w, scheme)
    r = refit_scales(q, w, h)
    before, after = _loss(w, q, h), _loss(w, r, h)
    assert (after <= before).all()
    assert after.sum() < 0.99 * before.sum()  # it does something on this layer
    assert torch.equal(r.qweight, q.qweight) and torch.equal(r.zero, q.zero)
    assert (r.scale > 0).all() and torch.equal(r.scale, r.scale.half().float())  # the format's float16 scales


def test_gptq_refit_option_is_refit_scales_of_plain_gptq() -> None:
    w, h = _layer(seed=1)
    scheme = WeightScheme(4, 128, False)
    plain = gptq_quantize(w, h, scheme)
    refit = gptq_quantize(w, h, scheme, refit=True)
    expected = refit_scales(plain, w, h)
    assert torch.equal(refit.qweight, plain.qweight) and torch.equal(refit.scale, expected.scale)
    assert _loss(w, refit, h).sum() < _loss(w, plain, h).sum()


def test_refit_keeps_a_group_that_sits_on_its_zero_point() -> None:
    """A group whose integers all equal the zero point has no influence on the loss: its scale is kept."""
    w, h = _layer(seed=2)
    w[:5, :128] = 0.0
    q = rtn_quantize(w, WeightScheme(4, 128, False))
    assert (q.qweight[:5, :128] == q.zero[:5, :1].int()).all()
    r = refit_scales(q, w, h)
    assert torch.equal(r.scale[:5, 0], q.scale[:5, 0])


def test_refit_names_mismatched_shapes() -> None:
    w, h = _layer()
    q = rtn_quantize(w, WeightScheme(4, 128, False))
    with pytest.raises(ValueError, match="hessian"):
        refit_scales(q, w, h[:128, :128])
