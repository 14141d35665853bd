"""Image+text chats as model inputs, and their safetensors dumps (project venv; used by fixtures, samples, eval).

A dump holds N chats as tensors `"{i}.{key}"` (`input_ids` [1, T] int64, `attention_mask` [1, T],
`pixel_values` [P, D] float32, `image_grid_thw` [1, 3], `mm_token_type_ids` [1, T] where the processor makes it)
plus metadata `n` and `keys`. The same file feeds both tools and the evaluator.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def chat_messages(question: str, answer: str | None) -> list[dict]:
    """The chat the project's calibration builds for one VQA sample (user: image + question; assistant: answer)."""
    msgs: list[dict] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def encode_chat(processor, image, question: str, answer: str | None) -> dict[str, torch.Tensor]:
    """Processor output (batch of 1) for one chat through the model folder's own chat template."""
    text = processor.apply_chat_template(chat_messages(question, answer), tokenize=False,
                                         add_generation_prompt=not answer)
    out = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def save_chats(path: Path, chats: list[dict[str, torch.Tensor]], meta: dict[str, str] | None = None) -> None:
    tensors = {f"{i}.{k}": v.contiguous() for i, c in enumerate(chats) for k, v in c.items()}
    md = {"n": str(len(chats)), "keys": ",".join(sorted(chats[0])), **(meta or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=md)
    tmp.rename(path)


def load_chats(path: Path) -> list[dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        if not md or "n" not in md or "keys" not in md:
            raise ValueError(f"{path}: not a chat dump (metadata 'n'/'keys' missing)")
        return [{k: f.get_tensor(f"{i}.{k}") for k in md["keys"].split(",")} for i in range(int(md["n"]))]


def chats_digest(chats: list[dict[str, torch.Tensor]]) -> str:
    """sha256 over every tensor's bytes, dtype and shape, in chat and key order (identity fingerprint)."""
    h = hashlib.sha256()
    for c in chats:
        for k in sorted(c):
            t = c[k].contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()
