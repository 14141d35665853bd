"""The layer loop's replay of a block equals the model's own forward of that block (no vLLM)."""

from __future__ import annotations

import pytest
import torch

from vllm_qe.calibration.activations import ActivationStore
from vllm_qe.calibration.data import build_inputs
from vllm_qe.calibration.driver import LayerLoop, Replay
from vllm_qe.calibration.model_structure import get_chains
from vllm_qe.testing.vqa import generate


def _model_and_samples(model_dir, n: int = 2):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    samples = [build_inputs(processor, s.image, s.question, s.answer) for s in generate(n, seed=0)]
    return model, samples


def _own_forward(model, unit, samples, hiddens):
    """The model's forward with `unit`'s hidden-state input replaced by `hiddens[i]`: what the block computes
    on those inputs inside the model."""
    outs = []
    for s, h in zip(samples, hiddens):
        got = {}

        def pre(mod, args, kwargs, h=h):
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        def post(mod, args, out, got=got):
            got["out"] = (out[0] if isinstance(out, tuple) else out).detach()

        hooks = [unit.register_forward_pre_hook(pre, with_kwargs=True), unit.register_forward_hook(post)]
        try:
            with torch.no_grad():
                model(**s)
        finally:
            for hk in hooks:
                hk.remove()
        outs.append(got["out"])
    return outs


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl_moe"])
def test_replayed_decoder_layer_equals_its_forward_in_the_model(tiny_dir, arch) -> None:
    """Replaying a language block on inputs other than the captured ones (what quantization-exposed propagation
    does) gives what the block computes on those inputs in the model: no KV cache left from the capture (or from
    an earlier replay) is attended to. With the model's DynamicCache kept in the captured kwargs this fails
    (the replay attends to the capture's keys)."""
    model, samples = _model_and_samples(tiny_dir(arch))
    chain = next(c for c in get_chains(model, model.config.model_type) if c.tower == "language")
    loop = LayerLoop(model, progress=False)
    calls, _, first = loop.capture(chain, samples)
    name, unit = chain.units[1]
    g = torch.Generator().manual_seed(0)
    perturbed = [h * 1.5 + 0.1 * torch.randn(h.shape, generator=g) for h in first]
    store = ActivationStore(None, None)
    for h in perturbed:
        store.append(h)
    masks = [torch.zeros(h.shape[:-1], dtype=torch.bool) for h in perturbed]
    replay = Replay(loop, unit, calls[1], store, masks)
    first_pass = list(replay())
    second_pass = list(replay())  # a second replay (statistics, then propagation) must not see the first's keys
    want = _own_forward(model, unit, samples, perturbed)
    for a, b, w in zip(first_pass, second_pass, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, w, rtol=1e-5, atol=1e-5)
