"""The tiny Qwen2-VL of a generated VQA task variant: its tokenizer trained on that task's corpus, its widths.

`build_task_model("hard", out_dir)` writes a complete random-init HF folder (as `tiny_models.build_tiny_model`
does for the default task, but with fan-in scaled init) that transformers and vLLM 0.32 load; `train_vqa` then trains it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vllm_qe.testing import tiny_models
from vllm_qe.testing.tokenizer import QWEN_CHAT_TEMPLATE, QWEN_SPECIALS

# Language model of the "hard" task's model (vision tower as `tiny_models`): head_dim 32, even heads (vLLM CPU).
HARD_TEXT = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2)


def task_tokenizer(sentences: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `sentences` with Qwen2-VL's special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def build_task_model(task: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the random-init tiny Qwen2-VL for `task` ("hard") to `out_dir` (replaced if present)."""
    if task != "hard":
        raise ValueError(f"unknown task {task!r}: the default task's model is tiny_models.build_tiny_model")
    from transformers import Qwen2VLForConditionalGeneration

    from vllm_qe.testing.vqa_hard import IMAGE_SIZE, corpus_sentences

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(seed)
    tok = task_tokenizer(corpus_sentences())
    config = tiny_models._qwen_config("qwen2_vl", tok)
    for k, v in HARD_TEXT.items():
        setattr(config.text_config, k, v)
    config.dtype = torch.float32
    model = Qwen2VLForConditionalGeneration(config).eval()
    init_fan_in(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _save_processor(out, tok, IMAGE_SIZE)
    return out


def init_fan_in(model: torch.nn.Module, seed: int) -> None:
    """Seeded N(0, 1/fan_in) matrices (embeddings N(0, 0.02)), unit norms, zero biases.

    `tiny_models`' N(0, 0.02) everywhere makes each 64-256-wide linear a contraction (gain ~0.3), so the vision
    merger's input LayerNorm (`ln_q`, whose name has no "norm") a weight of N(0, 0.01): image features reach the
    language model at ~1 % of their scale, and a task that depends on the image only stays at its answer prior for
    hundreds of steps (measured: colour-only, 150 steps, no progress; all kinds, 950 steps, none)."""
    norms = {f"{m}.weight" for m, mod in model.named_modules() if "Norm" in type(mod).__name__}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                std = 0.02 if "embed_tokens" in name else p[0].numel() ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name in norms:  # incl. the merger's `ln_q`, which `tiny_models` leaves at N(0, 0.01)
                p.fill_(1.0)
            else:
                p.zero_()


def _save_processor(out: Path, tok, image_size: int) -> None:
    """Qwen2-VL's image processor fixed to `image_size` x `image_size` pixels, and the chat template."""
    from transformers import Qwen2VLImageProcessorPil

    px = image_size * image_size
    Qwen2VLImageProcessorPil(min_pixels=px, max_pixels=px, patch_size=14, merge_size=2).save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": tok.chat_template}))
