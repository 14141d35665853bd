"""Calibration data: image+text samples through the `datasets` library, turned into model inputs.

SPEC is `builtin:vqa` (the generated task, written once to a local imagefolder: no network), or a local folder in
`datasets` imagefolder layout whose `metadata.jsonl` has `file_name`, `question` and optionally `answer`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

BUILTIN = "builtin:vqa"


def cache_dir() -> Path:
    return Path(os.environ.get("VLLM_QE_CACHE", Path.home() / ".cache" / "vllm-qe"))


def builtin_vqa_folder(n: int, seed: int, split: str) -> Path:
    """The generated VQA split as an imagefolder (written atomically once, then reused)."""
    from vllm_qe.testing.vqa import write_imagefolder

    folder = cache_dir() / f"vqa-{split}-seed{seed}-n{n}"
    if not (folder / "metadata.jsonl").is_file():
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        write_imagefolder(tmp, n, seed, split)
        tmp.rename(folder)
    return folder


def load_calibration_set(spec: str, num_samples: int, seed: int = 0, split: str = "calib"):
    """A `datasets.Dataset` with columns `image` (PIL), `question`, `answer` (may be empty)."""
    import datasets

    if spec == BUILTIN:
        folder = builtin_vqa_folder(num_samples, seed, split)
    else:
        folder = Path(spec)
        if not (folder / "metadata.jsonl").is_file():
            raise FileNotFoundError(f"{folder}/metadata.jsonl: calibration folder must be a datasets imagefolder "
                                    "with metadata.jsonl (file_name, question[, answer])")
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    for col in ("image", "question"):
        if col not in ds.column_names:
            raise ValueError(f"{folder}/metadata.jsonl: missing column {col!r}")
    if "answer" not in ds.column_names:
        ds = ds.add_column("answer", [""] * len(ds))
    return ds.select(range(min(num_samples, len(ds))))


def chat_messages(question: str, answer: str | None = None) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def build_inputs(processor, image, question: str, answer: str | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for one sample (batch of 1): the chat prompt with the image, plus the answer if given."""
    text = processor.apply_chat_template(chat_messages(question, answer), tokenize=False,
                                         add_generation_prompt=not answer)
    out = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
    return dict(out)
