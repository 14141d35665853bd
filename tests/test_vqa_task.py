"""The hard generated VQA task: deterministic, disjoint splits, one-token answers, answers true to the image."""

from __future__ import annotations

import colorsys
import hashlib

import numpy as np
import pytest

from vllm_qe.testing import vqa_hard
from vllm_qe.testing.vqa import model_task, task_module


def _digest(sample) -> str:
    return hashlib.sha1(sample.image.tobytes()).hexdigest()


def test_deterministic_and_pure():
    a = [vqa_hard.make_sample(3, i, "test") for i in range(24)]
    b = [vqa_hard.make_sample(3, i, "test") for i in reversed(range(24))][::-1]  # order does not matter
    assert [(_digest(s), s.question, s.answer, s.kind) for s in a] == \
           [(_digest(s), s.question, s.answer, s.kind) for s in b]
    assert _digest(vqa_hard.make_sample(4, 0, "test")) != _digest(a[0])


def test_splits_disjoint():
    train = {_digest(s) for s in vqa_hard.generate(600, 1, "train")}
    calib = {_digest(s) for s in vqa_hard.generate(300, 0, "calib")}
    test = {_digest(s) for s in vqa_hard.generate(600, 7, "test")}
    assert len(test) == 600 and not train & test and not calib & test and not train & calib


def test_answers_are_one_word_and_cover_every_kind():
    samples = vqa_hard.generate(600, 7, "test")
    assert {s.kind for s in samples} == set(vqa_hard.KINDS)
    assert all(s.answer in vqa_hard.answers() and " " not in s.answer for s in samples)
    # every answer class of the fine-grained kinds occurs
    assert {s.answer for s in samples if s.kind == "color"} == set(vqa_hard.HUES)
    assert {s.answer for s in samples if s.kind == "count"} == set(vqa_hard.answers()[12:21])
    assert {s.answer for s in samples if s.kind == "position"} == set(vqa_hard.POSITIONS)


def test_answers_are_single_tokens():
    from vllm_qe.testing.task_models import task_tokenizer

    tok = task_tokenizer(vqa_hard.corpus_sentences())
    newline = tok("\n")["input_ids"]
    for a in vqa_hard.answers():
        ids = tok("\n" + a)["input_ids"]
        assert ids[:len(newline)] == newline and len(ids) == len(newline) + 1, a


def _mask(sample) -> np.ndarray:
    return np.asarray(sample.image).max(-1) > 0


def test_count_answer_matches_the_image():
    from scipy import ndimage

    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    for s in [s for s in vqa_hard.generate(120, 7, "test") if s.kind == "count"]:
        _, n = ndimage.label(_mask(s))
        assert words[n] == s.answer


def test_position_and_color_answers_match_the_image():
    size = vqa_hard.IMAGE_SIZE
    for s in vqa_hard.generate(120, 7, "test"):
        m = _mask(s)
        if s.kind == "position":
            ys, xs = np.nonzero(m)
            cell = int(3 * ys.mean() // size) * 3 + int(3 * xs.mean() // size)
            assert vqa_hard.POSITIONS[cell] == s.answer
        elif s.kind == "color":
            r, g, b = np.asarray(s.image)[m][0] / 255.0
            hue = 360 * colorsys.rgb_to_hsv(r, g, b)[0]
            centre = 30 * vqa_hard.HUES.index(s.answer)
            assert abs((hue - centre + 180) % 360 - 180) <= vqa_hard.HUE_JITTER + 1.5


def test_task_registry():
    assert task_module("hard") is vqa_hard
    assert task_module("basic").make_sample(0, 0).answer
    with pytest.raises(ValueError, match="unknown VQA task"):
        task_module("nope")


def test_model_task_reads_training_log(tmp_path):
    assert model_task(tmp_path) == "basic"
    (tmp_path / "training_log.json").write_text('{"task": "hard"}')
    assert model_task(tmp_path) == "hard"
