"""MoE calibration (transformers only): per-expert checkpoint modules, the driver's expert statistics, VEQ wiring."""

from __future__ import annotations

import pytest
import torch

from vllm_qe.calibration.algorithms.base import Algorithm, StatsRequest
from vllm_qe.calibration.algorithms.rtn import rtn_quantize
from vllm_qe.format.checkpoint import inspect_checkpoint, load_tensors
from vllm_qe.format.quantizer import dequantize
from vllm_qe.format.spec import AdapterScheme, ModuleScheme, WeightScheme

LAYER0 = "model.language_model.layers.0.mlp.experts"


def test_moe_checkpoint_has_every_expert_as_modules_in_the_right_orientation(quantized_dir, tiny_dir):
    out = quantized_dir("qwen3_vl_moe", "rtn", wbits=4, abits=None)
    summary = inspect_checkpoint(out)
    assert len(summary.moe) == 2 and summary.moe[LAYER0]["experts"] == 8
    assert summary.moe[LAYER0]["hidden"] == 128 and summary.moe[LAYER0]["intermediate"] == 96
    tensors = load_tensors(out)
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in tensors)  # fused ones gone
    # the fixture stores experts in the original HF layout: gate_up_proj [E, H, 2I] (gate columns first)
    src = load_tensors(tiny_dir("qwen3_vl_moe"))
    gate_up, down = src[f"{LAYER0}.gate_up_proj"], src[f"{LAYER0}.down_proj"]
    from vllm_qe.calibration.fakequant import load_fake_quant_model
    from vllm_qe.calibration.moe import FakeQuantExperts

    model = load_fake_quant_model(out)
    fq = model.get_submodule(LAYER0)
    assert isinstance(fq, FakeQuantExperts)
    scheme = WeightScheme(4, 32, False)
    for e in (0, 5):
        for rows, w in ((slice(0, 96), gate_up[e, :, :96].t()), (slice(96, 192), gate_up[e, :, 96:].t())):
            q = rtn_quantize(w.float(), scheme)
            assert torch.equal(fq.w13[e, rows], dequantize(q.qweight, q.scale, q.zero, 32))
        q = rtn_quantize(down[e].t().float(), scheme)
        assert torch.equal(fq.w2[e], dequantize(q.qweight, q.scale, q.zero, 32))


class _Recorder(Algorithm):
    """RTN that keeps the statistics the driver hands it (with or without VEQ's affinity weighting)."""

    name = "recorder"

    def __init__(self, affinity: bool):
        super().__init__()
        self.affinity = affinity
        self.seen = {}

    def stats_request(self, scheme):
        return StatsRequest(gram=True, max_tokens=4096, affinity=self.affinity)

    def quantize_group(self, targets):
        out = {}
        for t in targets:
            self.seen[t.name] = t.stats
            out[t.name] = rtn_quantize(t.weight, t.scheme.weight)
        return out


@pytest.mark.parametrize("affinity, layer", [(False, 0), (True, 0), (True, 1)])
def test_driver_streams_each_experts_routed_tokens_with_router_affinity(tiny_dir, affinity, layer):
    from transformers import AutoProcessor

    from vllm_qe.calibration.api import load_model
    from vllm_qe.calibration.block import BlockCalibrator
    from vllm_qe.calibration.data import build_inputs
    from vllm_qe.calibration.model_structure import get_chains
    from vllm_qe.calibration.pipeline import calibrate_blocks
    from vllm_qe.testing.vqa import make_sample

    d = tiny_dir("qwen3_vl_moe")
    model, proc = load_model(d), AutoProcessor.from_pretrained(str(d))
    samples = [build_inputs(proc, s.image, s.question, s.answer) for s in (make_sample(3, i, "calib") for i in range(3))]
    img = model.config.image_token_id
    # reference routing of both MoE layers in the full-precision model. Layer 1's input includes Qwen3-VL's
    # deepstack visual features added between the layers: the driver must reproduce it (propagate="fp").
    routed: dict[int, list] = {0: [], 1: []}
    hooks, probs_of = [], {}
    for li in (0, 1):
        block = model.get_submodule(f"model.language_model.layers.{li}.mlp")
        hooks.append(block.gate.register_forward_hook(
            lambda m, a, o, li=li: probs_of.__setitem__(li, torch.softmax(o[0].float(), -1))))
        hooks.append(block.experts.register_forward_pre_hook(
            lambda m, a, li=li: routed[li].append((a[0].clone(), a[1].clone(), probs_of[li].clone()))))
    with torch.no_grad():
        for s in samples:
            model(**s)
    for h in hooks:
        h.remove()
    gamma = 5.0
    scheme = ModuleScheme(WeightScheme(4, 32, False), None, AdapterScheme())
    algo = _Recorder(affinity)
    language = [c for c in get_chains(model, "qwen3_vl_moe") if c.tower == "language"]
    block = BlockCalibrator(algo, lambda n: scheme if ".experts." in n else None, gamma=gamma, propagate="fp")
    calibrate_blocks(model, language, samples, img, block, progress=False)
    vision = torch.cat([(s["input_ids"] == img).reshape(-1) for s in samples])
    x = torch.cat([r[0] for r in routed[layer]])
    ids = torch.cat([r[1] for r in routed[layer]])
    probs = torch.cat([r[2] for r in routed[layer]])
    experts = LAYER0.replace("layers.0", f"layers.{layer}")
    total = 0
    for e in range(8):
        st = algo.seen[f"{experts}.{e}.gate_proj"]
        assert algo.seen[f"{experts}.{e}.up_proj"] is st  # gate and up read one input: one set of statistics
        tok = (ids == e).any(-1)
        assert st.n_tokens == int(tok.sum()) and st.n_vision == int((tok & vision).sum())
        assert st.expert.n_vision == st.n_vision and st.expert.gamma == gamma
        if st.n_tokens == 0:  # an idle expert: no statistics (GPTQ then falls back to H = I)
            assert st.xtx is None and torch.equal(st.hessian(), torch.eye(st.in_features, dtype=torch.float64))
            continue
        c = probs[tok, e] * torch.where(vision[tok], 1.0, gamma) if affinity else torch.ones(int(tok.sum()))
        want = (x[tok].double() * c.double()[:, None]).t() @ x[tok].double()
        torch.testing.assert_close(st.xtx, want, rtol=1e-4, atol=1e-6)
        total += st.n_tokens
    assert total == 2 * len(x)  # top-2: every token reaches two experts
    assert st.expert.layer_text + st.expert.layer_vision == len(x)


def test_veq_algorithm_on_driver_statistics_equals_the_pure_affinity_gptq():
    """VEQ-MA through the algorithm interface (driver-weighted Gram) = `veq_ma_quantize` on the raw tokens."""
    from vllm_qe.calibration.algorithms import get_algorithm
    from vllm_qe.calibration.algorithms.base import LinearTarget
    from vllm_qe.calibration.algorithms.veq import veq_ma_quantize
    from vllm_qe.calibration.moe import ExpertInfo
    from vllm_qe.calibration.stats import InputStats

    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 64, generator=g)
    is_text = torch.rand(300, generator=g) > 0.3
    p = torch.rand(300, generator=g)
    w = torch.randn(32, 64, generator=g) * 0.05
    gamma = 7.0
    st = InputStats(64, gram=True)
    st.update(x, ~is_text, p * torch.where(is_text, gamma, 1.0))
    st.expert = ExpertInfo(0, int(is_text.sum()), int((~is_text).sum()), 300, 0, gamma)
    scheme = ModuleScheme(WeightScheme(3, 32, False), None, AdapterScheme())
    q = get_algorithm("veq", mode="ma").quantize_group([LinearTarget("e", w, None, st, scheme)])["e"]
    ref = veq_ma_quantize(w, x, p, is_text, gamma, scheme.weight)
    assert torch.equal(q.qweight, ref.qweight)
