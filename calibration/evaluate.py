"""Quantized vs full precision on held-out data: next-token KL, top-1 agreement, per-layer output SNR, VQA
accuracy. The quantized model is the transformers fake-quant model of the checkpoint (`load_fake_quant_model`),
whose math the test suite proves equal to what vLLM serves."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from vllm_qe.calibration.bootstrap import bootstrap_interval
from vllm_qe.calibration.data import build_inputs
from vllm_qe.calibration.fakequant import FakeQuantLinear, load_fake_quant_model
from vllm_qe.testing.batching import FastEncoder, collate
from vllm_qe.testing.vqa import model_task, task_module

EVAL_SEED = 7


@dataclass
class EvalResult:
    accuracy: float  # exact-match VQA accuracy of the quantized model (greedy answer + end of turn)
    kl: float  # mean KL(P_fp || P_q) per answer-position token, nats
    top1: float  # top-1 agreement with the full-precision model at the same positions
    fp_accuracy: float = 0.0  # the full-precision model on the same questions
    # 95 % bootstrap intervals over questions: accuracy, fp_accuracy, accuracy_delta (paired: q - fp), kl, top1
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    accuracy_by_kind: dict[str, float] = field(default_factory=dict)
    layer_snr_db: dict[str, float] = field(default_factory=dict)  # per quantized linear, given FP inputs
    n: int = 0
    task: str = "basic"

    def to_dict(self) -> dict:
        return asdict(self)

    def ci(self, key: str, digits: int = 3) -> str:
        """`[low, high]` of `intervals[key]` (empty if absent)."""
        if key not in self.intervals:
            return ""
        lo, hi = self.intervals[key]
        return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


@dataclass
class QuestionScores:
    """Per-question figures (all [n]): what the bootstrap resamples."""

    q_correct: torch.Tensor
    fp_correct: torch.Tensor
    kl_sum: torch.Tensor  # nats, summed over the question's answer positions
    agree: torch.Tensor  # answer positions where the top-1 tokens agree
    positions: torch.Tensor
    kinds: list[str]


@torch.no_grad()
def score_questions(fp_model, q_model, processor, samples, batch_size: int = 32) -> QuestionScores:
    """Both models on every sample, in right-padded batches (padding after the answer changes no logit of it)."""
    enc = FastEncoder(processor)
    pad_id = processor.tokenizer.pad_token_id
    q_ok, fp_ok, kls, agrees, npos = [], [], [], [], []
    for b in range(0, len(samples), batch_size):
        chunk = samples[b:b + batch_size]
        full = [enc(s.image, s.question, s.answer) for s in chunk]
        n_prompt = [enc(s.image, s.question)["input_ids"].shape[1] for s in chunk]
        batch = collate(full, pad_id)
        fp_logits = fp_model(**batch).logits
        q_logits = fp_logits if q_model is fp_model else q_model(**batch).logits
        for i, f in enumerate(full):
            pos = torch.arange(n_prompt[i] - 1, f["input_ids"].shape[1] - 1)
            tgt = f["input_ids"][0, pos + 1]
            lp_fp = torch.log_softmax(fp_logits[i, pos].double(), -1)
            lp_q = torch.log_softmax(q_logits[i, pos].double(), -1)
            kls.append(float((lp_fp.exp() * (lp_fp - lp_q)).sum()))
            agrees.append(int((lp_fp.argmax(-1) == lp_q.argmax(-1)).sum()))
            npos.append(len(pos))
            q_ok.append(int(bool((lp_q.argmax(-1) == tgt).all())))
            fp_ok.append(int(bool((lp_fp.argmax(-1) == tgt).all())))
    t = torch.tensor
    return QuestionScores(t(q_ok, dtype=torch.float64), t(fp_ok, dtype=torch.float64), t(kls, dtype=torch.float64),
                          t(agrees, dtype=torch.float64), t(npos, dtype=torch.float64), [s.kind for s in samples])


def summarize(sc: QuestionScores, resamples: int = 2000) -> EvalResult:
    """Point estimates and 95 % bootstrap intervals (questions resampled; the FP difference paired)."""
    n = len(sc.kinds)
    kinds = sorted(set(sc.kinds))
    by_kind = {k: float(sc.q_correct[[i for i in range(n) if sc.kinds[i] == k]].mean()) for k in kinds}
    ci = {
        "accuracy": bootstrap_interval(sc.q_correct, resamples=resamples),
        "fp_accuracy": bootstrap_interval(sc.fp_correct, resamples=resamples),
        "accuracy_delta": bootstrap_interval(sc.q_correct - sc.fp_correct, resamples=resamples),
        "kl": bootstrap_interval(sc.kl_sum, sc.positions, resamples=resamples),
        "top1": bootstrap_interval(sc.agree, sc.positions, resamples=resamples),
    }
    return EvalResult(accuracy=float(sc.q_correct.mean()), kl=float(sc.kl_sum.sum() / sc.positions.sum()),
                      top1=float(sc.agree.sum() / sc.positions.sum()), fp_accuracy=float(sc.fp_correct.mean()),
                      intervals=ci, accuracy_by_kind=by_kind, n=n)


def evaluate(fp_model, q_model, processor, n: int = 200, seed: int = EVAL_SEED, snr_samples: int = 8,
             task: str = "basic", batch_size: int = 32) -> EvalResult:
    """`n` held-out questions of `task`'s test split: accuracy (quantized and FP), KL, top-1, all with 95 %
    bootstrap intervals, and per-layer SNR on the first `snr_samples`."""
    samples = task_module(task).generate(n, seed, "test")
    res = summarize(score_questions(fp_model, q_model, processor, samples, batch_size))
    res.task = task
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


def evaluate_dirs(fp_dir, q_dir, n: int = 200, seed: int = EVAL_SEED, task: str | None = None,
                  batch_size: int = 32) -> EvalResult:
    """Evaluate checkpoint `q_dir` (None: the FP model itself) against `fp_dir` on `task` (default: the task
    `fp_dir` was trained on, from its training_log.json)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(fp_dir))
    fp = AutoModelForImageTextToText.from_pretrained(str(fp_dir), dtype=torch.float32).eval()
    from pathlib import Path

    same = q_dir is None or Path(q_dir).resolve() == Path(fp_dir).resolve()
    q = fp if same else load_fake_quant_model(q_dir)
    return evaluate(fp, q, processor, n=n, seed=seed, task=task or model_task(fp_dir), batch_size=batch_size)
