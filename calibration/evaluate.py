"""Quantized vs full precision on held-out data: next-token KL, top-1 agreement, per-layer output SNR, VQA
accuracy. The quantized model is the transformers fake-quant model of the checkpoint (`load_fake_quant_model`),
whose math the test suite proves equal to what vLLM serves."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from vllm_qe.calibration.data import build_inputs
from vllm_qe.calibration.fakequant import FakeQuantLinear, load_fake_quant_model
from vllm_qe.testing.vqa import generate

EVAL_SEED = 7


@dataclass
class EvalResult:
    accuracy: float  # exact-match VQA accuracy (greedy answer + end of turn)
    kl: float  # mean KL(P_fp || P_q) per answer-position token, nats
    top1: float  # top-1 agreement with the full-precision model at the same positions
    accuracy_by_kind: dict[str, float] = field(default_factory=dict)
    layer_snr_db: dict[str, float] = field(default_factory=dict)  # per quantized linear, given FP inputs
    n: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _answer_positions(processor, sample) -> tuple[dict, torch.Tensor, torch.Tensor]:
    full = build_inputs(processor, sample.image, sample.question, sample.answer)
    n_prompt = build_inputs(processor, sample.image, sample.question)["input_ids"].shape[1]
    ids = full["input_ids"][0]
    # Positions whose next token is an answer token or the end-of-turn token right after it.
    pos = torch.arange(n_prompt - 1, ids.shape[0] - 1)
    targets = ids[pos + 1]
    return full, pos, targets


@torch.no_grad()
def evaluate(fp_model, q_model, processor, n: int = 200, seed: int = EVAL_SEED, snr_samples: int = 8) -> EvalResult:
    samples = generate(n, seed, "test")
    kl_sum, agree, count = 0.0, 0, 0
    hits: dict[str, list[int]] = {}
    for s in samples:
        inputs, pos, tgt = _answer_positions(processor, s)
        lp_fp = torch.log_softmax(fp_model(**inputs).logits[0, pos].double(), -1)
        lp_q = torch.log_softmax(q_model(**inputs).logits[0, pos].double(), -1)
        kl_sum += float((lp_fp.exp() * (lp_fp - lp_q)).sum())
        agree += int((lp_fp.argmax(-1) == lp_q.argmax(-1)).sum())
        count += len(pos)
        hits.setdefault(s.kind, []).append(int(bool((lp_q.argmax(-1) == tgt).all())))
    allh = [h for v in hits.values() for h in v]
    res = EvalResult(accuracy=sum(allh) / len(allh), kl=kl_sum / count, top1=agree / count,
                     accuracy_by_kind={k: sum(v) / len(v) for k, v in sorted(hits.items())}, n=n)
    res.layer_snr_db = layer_snr(fp_model, q_model, processor, samples[:snr_samples])
    return res


@torch.no_grad()
def layer_snr(fp_model, q_model, processor, samples) -> dict[str, float]:
    """SNR (dB) of each quantized linear's output against the FP linear, both fed the FP model's input; MoE
    experts as one entry per layer (`<...>.experts`: the routed, router-weighted sum over its experts)."""
    from vllm_qe.calibration.moe import FakeQuantExperts

    fq = {n: m for n, m in q_model.named_modules() if isinstance(m, (FakeQuantLinear, FakeQuantExperts))}
    sig: dict[str, float] = {}
    noise: dict[str, float] = {}
    hooks = []
    for name, mod in fp_model.named_modules():
        if name in fq and not isinstance(mod, (FakeQuantLinear, FakeQuantExperts)):
            def hook(m, inp, out, name=name):
                y_q = fq[name](*inp)
                sig[name] = sig.get(name, 0.0) + float(out.double().pow(2).sum())
                noise[name] = noise.get(name, 0.0) + float((out - y_q).double().pow(2).sum())
            hooks.append(mod.register_forward_hook(hook))
    try:
        for s in samples:
            fp_model(**build_inputs(processor, s.image, s.question, s.answer))
    finally:
        for h in hooks:
            h.remove()
    return {k: 10 * math.log10(sig[k] / max(noise[k], 1e-30)) for k in sig}


def evaluate_dirs(fp_dir, q_dir, n: int = 200, seed: int = EVAL_SEED) -> EvalResult:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(fp_dir))
    fp = AutoModelForImageTextToText.from_pretrained(str(fp_dir), dtype=torch.float32).eval()
    from pathlib import Path

    same = q_dir is None or Path(q_dir).resolve() == Path(fp_dir).resolve()
    q = fp if same else load_fake_quant_model(q_dir)
    return evaluate(fp, q, processor, n=n, seed=seed)
