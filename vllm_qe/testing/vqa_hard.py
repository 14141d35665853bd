"""A harder generated VQA task, built so that quantization error shows up as lost answers.

The answers hinge on fine distinctions that a low-bit model loses first: twelve close hues (30 degrees apart on
the colour wheel, jittered within their bin), counts 1-9 on a 3x3 grid, nine positions, which of two shapes is
larger (area ratios down to 1.15), which colour belongs to which shape when two are shown (binding), and
handwritten digits. Every sample is a pure function of `(seed, index, split)`: the split name is part of the
random stream, the test split draws only odd-indexed digit images (train/calib the even ones), so splits are
disjoint. Every answer is one word, and one token of the tokenizer trained on `corpus_sentences()`.
"""

from __future__ import annotations

import colorsys
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vllm_qe.testing.vqa import NUMBER_WORDS, VQASample, _digits, _draw_shape

# 84 = 3 x 28: with Qwen2-VL's 14-pixel patches merged 2x2, each of the 9 image tokens sees one cell of the grid.
IMAGE_SIZE = 84

# Hue bin centres (degrees): 0, 30, ..., 330. A sample's hue is the centre +- HUE_JITTER degrees.
HUES = ("red", "orange", "yellow", "lime", "green", "jade", "cyan", "azure", "blue", "violet", "magenta", "pink")
HUE_JITTER = 11.0
SHAPES = ("circle", "square", "triangle")
# 3x3 grid cells, row-major from the top-left corner.
POSITIONS = ("northwest", "north", "northeast", "west", "center", "east", "southwest", "south", "southeast")
KINDS = ("color", "count", "position", "size", "binding", "digit")
QUESTIONS = {
    "color": "What color is the shape?",
    "count": "How many shapes are there?",
    "position": "Where is the shape?",
    "size": "Which shape is larger?",
    "digit": "What digit is shown?",
}
BINDING_QUESTION = "What color is the {shape}?"
_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0}  # area / r^2 of `_draw_shape`'s figures
MIN_AREA_RATIO = 1.15


def hue_rgb(rng: random.Random) -> tuple[str, tuple[int, int, int]]:
    """A hue name and an RGB colour in its bin (saturation and value also vary, so hue is what matters)."""
    i = rng.randrange(len(HUES))
    h = (30.0 * i + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360.0
    r, g, b = colorsys.hsv_to_rgb(h / 360.0, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    return HUES[i], (round(255 * r), round(255 * g), round(255 * b))


def _cell_center(cell: int, s: int) -> tuple[float, float]:
    return s * (1 + 2 * (cell % 3)) / 6, s * (1 + 2 * (cell // 3)) / 6


def make_sample(seed: int, index: int, split: str = "train") -> VQASample:
    """Sample `index` of `split` (kind = KINDS[index % 6]); a pure function of its arguments."""
    rng = random.Random(f"hard-{seed}-{split}-{index}")
    kind = KINDS[index % len(KINDS)]
    s = IMAGE_SIZE
    img = Image.new("RGB", (s, s), (0, 0, 0))
    d = ImageDraw.Draw(img)
    question = QUESTIONS.get(kind, "")
    if kind == "color":
        answer, rgb = hue_rgb(rng)
        _draw_shape(d, rng.choice(SHAPES), s * rng.uniform(0.35, 0.65), s * rng.uniform(0.35, 0.65),
                    s * rng.uniform(0.12, 0.2), rgb)
    elif kind == "count":
        n = rng.randint(1, 9)
        shape = rng.choice(SHAPES)
        for cell in rng.sample(range(9), n):
            cx, cy = _cell_center(cell, s)
            _draw_shape(d, shape, cx + s * rng.uniform(-0.03, 0.03), cy + s * rng.uniform(-0.03, 0.03),
                        s * rng.uniform(0.06, 0.11), hue_rgb(rng)[1])
        answer = NUMBER_WORDS[n]
    elif kind == "position":
        cell = rng.randrange(9)
        cx, cy = _cell_center(cell, s)
        _draw_shape(d, rng.choice(SHAPES), cx + s * rng.uniform(-0.05, 0.05), cy + s * rng.uniform(-0.05, 0.05),
                    s * rng.uniform(0.06, 0.1), hue_rgb(rng)[1])
        answer = POSITIONS[cell]
    elif kind in ("size", "binding"):
        a, b = rng.sample(SHAPES, 2)
        left, right = (a, b) if rng.random() < 0.5 else (b, a)
        if kind == "size":
            # Area ratio in [MIN_AREA_RATIO, 2]; `a` is the larger one.
            f = float(np.sqrt(_AREA[a] / (_AREA[b] * rng.uniform(MIN_AREA_RATIO, 2.0))))  # r_b / r_a
            ra = s * rng.uniform(0.1, 0.2) / max(1.0, f)
            radius = {a: ra, b: ra * f}
            colors = {a: hue_rgb(rng)[1], b: hue_rgb(rng)[1]}
            answer = a
        else:
            (na, ca), (nb, cb) = hue_rgb(rng), hue_rgb(rng)
            while nb == na:
                nb, cb = hue_rgb(rng)
            radius = {a: s * rng.uniform(0.1, 0.17), b: s * rng.uniform(0.1, 0.17)}
            colors = {a: ca, b: cb}
            question, answer = BINDING_QUESTION.format(shape=a), na
        for shape, cx in ((left, 0.27), (right, 0.73)):
            _draw_shape(d, shape, s * (cx + rng.uniform(-0.03, 0.03)), s * rng.uniform(0.35, 0.65),
                        radius[shape], colors[shape])
    else:  # digit: even-indexed images for train/calib, odd for test (no image in both)
        images, targets = _digits()
        i = rng.randrange(1 if split == "test" else 0, len(images), 2)
        arr = (images[i] / 16.0 * 255).astype(np.uint8)
        size = int(s * rng.uniform(0.6, 0.8))
        digit = Image.fromarray(arr).resize((size, size), Image.NEAREST).convert("RGB")
        img.paste(digit, (rng.randrange(0, s - size + 1), rng.randrange(0, s - size + 1)))
        answer = NUMBER_WORDS[int(targets[i])]
    return VQASample(img, question, answer, kind)


def generate(n: int, seed: int = 0, split: str = "train") -> list[VQASample]:
    return [make_sample(seed, i, split) for i in range(n)]


def answers() -> list[str]:
    """Every possible answer (each one word)."""
    return list(HUES) + list(NUMBER_WORDS[1:]) + list(POSITIONS) + list(SHAPES) + list(NUMBER_WORDS[:1])


def questions() -> list[str]:
    return list(QUESTIONS.values()) + [BINDING_QUESTION.format(shape=sh) for sh in SHAPES]


def corpus_sentences() -> list[str]:
    """Tokenizer training text: the task's questions and answers plus chat scaffolding."""
    words = answers()
    extra = ["You are a helpful assistant.", "system user assistant", "Answer with one word.",
             "0 1 2 3 4 5 6 7 8 9 10"]
    return questions() * 50 + [" ".join(words)] * 50 + words * 40 + extra * 20


def write_imagefolder(out_dir: str | Path, n: int, seed: int = 0, split: str = "calib") -> Path:
    """Write `n` samples as a `datasets` imagefolder (PNG files + metadata.jsonl: file_name, question, answer,
    kind): a calibration set for `vllm-qe calibrate --calib`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.jsonl", "w") as meta:
        for i, smp in enumerate(generate(n, seed, split)):
            name = f"{split}_{i:05d}.png"
            smp.image.save(out / name)
            meta.write(json.dumps({"file_name": name, "question": smp.question, "answer": smp.answer,
                                   "kind": smp.kind}) + "\n")
    return out
