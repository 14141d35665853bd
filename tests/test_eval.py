"""Evaluation statistics: the bootstrap interval, the per-question summary, the fast batched encoder."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_qe.calibration.bootstrap import bootstrap_interval
from vllm_qe.calibration.evaluate import QuestionScores, summarize


def _bernoulli(n: int, p: float, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < p).double()


def test_interval_contains_the_estimate_and_shrinks_with_n():
    widths = []
    for n in (100, 1000, 10000):
        x = _bernoulli(n, 0.7)
        lo, hi = bootstrap_interval(x)
        assert lo < float(x.mean()) < hi
        widths.append(hi - lo)
    assert widths[0] > 2.5 * widths[1] > 2.5 * 2.5 * widths[2]


def test_known_answer_bernoulli_and_ratio():
    # Binomial proportion: the 95 % interval is mean +- 1.96 sqrt(p (1 - p) / n).
    n, p = 4000, 0.5
    x = _bernoulli(n, p, seed=1)
    lo, hi = bootstrap_interval(x, resamples=4000)
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(float(x.mean()), abs=0.2 * half)
    # Ratio of sums with a constant denominator is the mean scaled.
    lo3, hi3 = bootstrap_interval(x, torch.full((n,), 3.0), resamples=4000)
    assert (lo3, hi3) == pytest.approx((lo / 3, hi / 3), rel=1e-9)


def test_degenerate_and_paired_cases():
    assert bootstrap_interval(torch.ones(50)) == (1.0, 1.0)
    x = _bernoulli(500, 0.6)
    assert bootstrap_interval(x - x) == (0.0, 0.0)  # identical methods: no difference
    worse = x.clone()
    worse[torch.nonzero(x)[:60, 0]] = 0  # 60 of 500 answers lost
    lo, hi = bootstrap_interval(worse - x)
    assert hi < 0 and lo < -0.12 + 1e-9 < hi + 0.1
    assert bootstrap_interval(x, seed=3) == bootstrap_interval(x, seed=3)


def test_bad_input():
    with pytest.raises(ValueError, match="no values"):
        bootstrap_interval(torch.zeros(0))
    with pytest.raises(ValueError, match="den has 3"):
        bootstrap_interval(torch.zeros(4), torch.ones(3))
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(torch.zeros(4), level=95)


def test_summarize_figures():
    n = 400
    fp = _bernoulli(n, 0.8, seed=2)
    q = fp.clone()
    q[:100] = 0  # the quantized model loses every answer of the first 100 questions
    sc = QuestionScores(q_correct=q, fp_correct=fp, kl_sum=torch.full((n,), 0.03), agree=torch.full((n,), 2.0),
                        positions=torch.full((n,), 3.0), kinds=["a", "b"] * (n // 2))
    r = summarize(sc, resamples=500)
    assert r.fp_accuracy == pytest.approx(float(fp.mean())) and r.accuracy == pytest.approx(float(q.mean()))
    assert r.kl == pytest.approx(0.01) and r.top1 == pytest.approx(2 / 3)
    assert r.intervals["kl"] == pytest.approx((0.01, 0.01)) and r.intervals["top1"] == pytest.approx((2 / 3, 2 / 3))
    lo, hi = r.intervals["accuracy_delta"]
    assert lo <= r.accuracy - r.fp_accuracy <= hi < 0
    assert r.accuracy_by_kind["a"] == pytest.approx(float(q[0::2].mean()))
    assert r.n == n and r.ci("accuracy").startswith("[")


def test_fast_encoder_equals_processor():
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from vllm_qe.calibration.data import build_inputs
    from vllm_qe.testing import vqa_hard
    from vllm_qe.testing.batching import FastEncoder, collate
    from vllm_qe.testing.task_models import task_tokenizer

    tok = task_tokenizer(vqa_hard.corpus_sentences())
    px = vqa_hard.IMAGE_SIZE ** 2
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=px, max_pixels=px), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=tok.chat_template)
    enc = FastEncoder(proc)
    samples = vqa_hard.generate(8, 7, "test")
    for s in samples:
        for answer in (s.answer, None):
            fast, ref = enc(s.image, s.question, answer), build_inputs(proc, s.image, s.question, answer)
            assert fast.keys() == ref.keys()
            for k in ref:
                assert torch.allclose(fast[k].double(), ref[k].double(), atol=1e-5), k
    assert enc._fast_ok == {(vqa_hard.IMAGE_SIZE, vqa_hard.IMAGE_SIZE): True}
    batch = collate([enc(s.image, s.question, s.answer) for s in samples], tok.pad_token_id)
    lengths = [enc(s.image, s.question, s.answer)["input_ids"].shape[1] for s in samples]
    assert batch["input_ids"].shape == (8, max(lengths)) and int(batch["attention_mask"].sum()) == sum(lengths)


def test_paired_ratio_interval_covers_calibration_set_noise():
    """Two methods whose per-set ratio varies across calibration sets: the two-level interval is wider than the
    questions-only one of a single set, contains the geometric mean, and a clearly better method lies below 1."""
    from vllm_qe.calibration.bootstrap import paired_ratio_interval

    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 40, generator=g) + 0.5
    b = base.repeat(3, 1)
    a = b * torch.tensor([[0.5], [1.0], [2.0]])  # set-level ratios 0.5, 1, 2: geometric mean 1
    est, lo, hi = paired_ratio_interval(a, b)
    assert abs(est - 1.0) < 1e-9 and lo < 0.75 and hi > 1.3
    _, lo1, hi1 = paired_ratio_interval(a[:1], b[:1])
    assert hi1 - lo1 < 1e-9  # one set, an exact per-question ratio: no question noise
    est2, lo2, hi2 = paired_ratio_interval(b * 0.6 * (1 + 0.1 * torch.rand(3, 40, generator=g)), b)
    assert hi2 < 1.0 and lo2 <= est2 <= hi2
    with pytest.raises(ValueError, match=r"\[S, n\]"):
        paired_ratio_interval(a[0], b[0])
