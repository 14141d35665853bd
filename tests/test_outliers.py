"""The outlier fixture (vllm_qe/testing/outliers.py): same logits bit for bit, much larger activation outliers, and
round-to-nearest loses the rescaled columns (what makes the fixture rank weight quantizers)."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_qe.testing.outliers import decoder_layer_prefixes, inject_activation_outliers, write_outlier_variant


def _load(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()


def _channel_peak_ratio(model, ids: torch.Tensor, suffix: str) -> float:
    """max over the modules named `*suffix` of (largest input channel's |x| max) / (median channel's)."""
    ratios = []

    def hook(_m, inp, _out):
        peak = inp[0].abs().flatten(0, -2).amax(0)
        ratios.append(float(peak.max() / peak.median()))

    hs = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith(suffix) and "visual" not in n]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hs:
        h.remove()
    return max(ratios)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_outlier_variant_keeps_the_function_and_adds_outliers(tiny_dir, tmp_path, arch):
    src = tiny_dir(arch)
    dst = write_outlier_variant(src, tmp_path / "out", scale=64.0, fraction=0.1, seed=3)
    a, b = _load(src), _load(dst)
    ids = torch.randint(10, a.config.get_text_config().vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)  # power-of-two scale: exact
    for suffix in ("mlp.down_proj", "self_attn.q_proj", "mlp.gate_proj"):
        assert _channel_peak_ratio(b, ids, suffix) > 8 * _channel_peak_ratio(a, ids, suffix)
    meta = json.loads((dst / "outliers.json").read_text())
    assert meta["scale"] == 64.0 and len(meta["channels"]) == 3 * a.config.get_text_config().num_hidden_layers


def test_rtn_loses_the_rescaled_columns():
    """On one rescaled linear: the rescaled columns fall below the group's step and RTN loses most of their output
    (the salient-channel failure AWQ was built for); before the transform it kept most of it."""
    from vllm_qe.format.quantizer import choose_qparams, dequantize, quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(2048, 128, generator=g)
    state = {"model.layers.0.input_layernorm.weight": torch.ones(128),
             **{f"model.layers.0.self_attn.{n}_proj.weight": w.clone() for n in "qkv"},
             "model.layers.0.post_attention_layernorm.weight": torch.ones(128),
             "model.layers.0.mlp.gate_proj.weight": torch.zeros(8, 128),
             "model.layers.0.mlp.up_proj.weight": torch.zeros(8, 128),
             "model.layers.0.mlp.down_proj.weight": torch.zeros(128, 8)}
    new, chosen = inject_activation_outliers(state, scale=64.0, fraction=0.05, seed=0)
    ch = torch.tensor(chosen["model.layers.0.input_layernorm"])
    assert len(ch) == round(0.05 * 128)
    x2, w2 = x * new["model.layers.0.input_layernorm.weight"], new["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(x2 @ w2.t(), x @ w.t(), atol=1e-5)

    def lost_share(xx: torch.Tensor, ww: torch.Tensor) -> float:
        """|output error| / |output| of the chosen columns alone, after 3-bit g32 RTN of the whole matrix."""
        qp = choose_qparams(ww, 3, 32, False, "minmax")
        wq = dequantize(quantize(ww, qp), qp.scale, qp.zero, 32)
        return float((xx[:, ch] @ (ww - wq)[:, ch].t()).norm() / (xx[:, ch] @ ww[:, ch].t()).norm())

    assert lost_share(x, w) < 0.3
    assert lost_share(x2, w2) > 0.8


def test_bad_arguments_are_refused(tmp_path):
    state = {"model.layers.0.input_layernorm.weight": torch.ones(4)}
    with pytest.raises(ValueError, match="power of two"):
        inject_activation_outliers(state, scale=50.0)
    with pytest.raises(ValueError, match="fraction"):
        inject_activation_outliers(state, fraction=1.5)
    with pytest.raises(ValueError, match="decoder"):
        inject_activation_outliers({"visual.blocks.0.norm1.weight": torch.ones(4)})
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        write_outlier_variant(tmp_path, tmp_path / "x")
    assert decoder_layer_prefixes({"model.language_model.layers.2.input_layernorm.weight": torch.ones(1),
                                   "model.language_model.layers.10.input_layernorm.weight": torch.ones(1)}) == [
        "model.language_model.layers.2.", "model.language_model.layers.10."]
