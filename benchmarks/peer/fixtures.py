"""Peer-benchmark fixtures (project venv): the project's tiny-model builder, resized, then briefly trained.

`python benchmarks/peer/fixtures.py NAME OUT_DIR` writes an HF folder (float32 safetensors, tokenizer, processor,
chat template) and `fixture.json` (spec + training log); a folder whose fixture.json has the same spec is reused.

Why this init and training: with the project's tiny-model init (N(0, 0.02) everywhere) the next-token
distributions are nearly uniform and every layer's output is small against the residual stream, so weight
quantization hardly moves the logits; even after 200 training steps RTN W4 g128 gave KL 1e-4 nats and GPTQ
1e-6..3e-5 (measured on the held-out chats), too little to rank quantizers. The fixtures therefore use
matrices N(0, gain^2 / fan_in) with gain 0.5 and embeddings N(0, 0.3^2): untrained, next-token entropy is about
1.1 nats and RTN W4 g128 KL about 0.08. `qwen2_5_vl-odd` is then trained briefly (next-token loss on every text
token of generated VQA chats from the project's task generator, a split disjoint from calibration and
evaluation): entropy 0.48 nats, RTN W4 KL 0.005, W3 0.02, a model that has learned the task. `qwen2_vl-256`
stays random-init (more sensitive to weight error): two different kinds of fixture, neither a real model.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chats import encode_chat  # noqa: E402

# name -> project tiny-model architecture, language-model widths, vision output key, training schedule.
FIXTURES: dict[str, dict] = {
    # Odd widths like issue 11's model: down_proj has 200 input features (no group size of 32/128 divides it).
    "qwen2_5_vl-odd": dict(arch="qwen2_5_vl", vision_out="out_hidden_size",
                           text=dict(hidden_size=128, intermediate_size=200, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2),
                           init_gain=0.5, emb_std=0.3, steps=100, batch=16, lr=1e-3, seed=0),
    # Wider Qwen2-VL: 2 groups of 128 per attention row, down_proj 640 = 5 x 128 (quantized at every setting).
    "qwen2_vl-256": dict(arch="qwen2_vl", vision_out="hidden_size",
                         text=dict(hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2),
                         init_gain=0.5, emb_std=0.3, steps=0, batch=16, lr=1e-3, seed=1),
    # The trained odd fixture given activation outliers without changing its function (vllm_qe/testing/outliers.py:
    # 8 % of the channels per norm and MLP x64, as in pretrained LLMs). Its KL is ~50x the source's and moves
    # ~10 % between calibration sets (the source's: up to 3-4x), so it can rank quantizers.
    "qwen2_5_vl-odd-outliers": dict(source="qwen2_5_vl-odd", outliers=dict(scale=64.0, fraction=0.08, seed=0)),
    # Harness smoke test only (random init: nearly uniform logits, KL says little).
    "smoke": dict(arch="qwen2_5_vl", vision_out="out_hidden_size",
                  text=dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2), init_gain=0.5, emb_std=0.3, steps=0, batch=16, lr=2e-3,
                  seed=0),
}
TRAIN_SPLIT, TRAIN_SEED, N_TRAIN = "train", 1, 1200


def _collate(batch: list[dict[str, torch.Tensor]], pad_id: int, image_token: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels = every non-image, non-padding token (the model shifts them)."""
    n = max(b["input_ids"].shape[1] for b in batch)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, n - t.shape[1]), value=value)

    out = {"input_ids": torch.cat([pad(b["input_ids"], pad_id) for b in batch]),
           "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batch]),
           "pixel_values": torch.cat([b["pixel_values"] for b in batch]),
           "image_grid_thw": torch.cat([b["image_grid_thw"] for b in batch])}
    if "mm_token_type_ids" in batch[0]:
        out["mm_token_type_ids"] = torch.cat([pad(b["mm_token_type_ids"], 0) for b in batch])
    labels = out["input_ids"].clone()
    labels[(out["attention_mask"] == 0) | (labels == image_token)] = -100
    out["labels"] = labels
    return out


def build_fixture(name: str, out: Path, vllm_qe: str) -> Path:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vllm_qe.calibration.fixtures.vqa import generate

    spec = FIXTURES[name]
    stamp = {"name": name, **spec}
    meta = out / "fixture.json"
    if meta.is_file() and json.loads(meta.read_text()).get("spec") == stamp:
        print(f"fixture {name}: cached at {out}")
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if "source" in spec:  # a transform of another fixture (built or reused first)
        from vllm_qe.testing.outliers import write_outlier_variant

        src = build_fixture(spec["source"], out.with_name(spec["source"]), vllm_qe)
        write_outlier_variant(src, tmp, **spec["outliers"])
        source_meta = json.loads((src / "fixture.json").read_text())
        (tmp / "fixture.json").write_text(json.dumps({"spec": stamp, "source": source_meta}, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out
    subprocess.run([vllm_qe, "tiny-model", spec["arch"], str(tmp), "--seed", str(spec["seed"])], check=True,
                   stdout=subprocess.DEVNULL)
    config = AutoConfig.from_pretrained(str(tmp))
    for k, v in spec["text"].items():
        setattr(config.text_config, k, v)
    config.text_config.layer_types = ["full_attention"] * spec["text"]["num_hidden_layers"]
    setattr(config.vision_config, spec["vision_out"], spec["text"]["hidden_size"])
    torch.manual_seed(spec["seed"])
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():  # matrices N(0, gain^2 / fan_in), embeddings N(0, emb_std^2), unit norms, N(0, 0.01) rest
        for pname, p in model.named_parameters():
            if p.ndim >= 2 and "embed_tokens" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * spec["emb_std"])
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * spec["init_gain"] / math.sqrt(p[0].numel()))
            elif "norm" in pname and pname.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    processor = AutoProcessor.from_pretrained(str(tmp))
    n_train = N_TRAIN if spec["steps"] else 0
    data = [encode_chat(processor, s.image, s.question, s.answer) for s in generate(n_train, TRAIN_SEED, TRAIN_SPLIT)]
    pad_id = processor.tokenizer.pad_token_id
    steps, bs = spec["steps"], spec["batch"]
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    model.train()
    t0, log = time.time(), []
    for step in range(steps):
        idx = torch.randint(0, len(data), (bs,), generator=g).tolist()
        loss = model(**_collate([data[i] for i in idx], pad_id, config.image_token_id)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(float(loss), 4), "seconds": round(time.time() - t0, 1)})
            print(f"  {name}: {json.dumps(log[-1])}", flush=True)
    model.eval()
    model.save_pretrained(str(tmp))
    (tmp / "fixture.json").write_text(json.dumps({"spec": stamp, "train_log": log, "n_train": N_TRAIN,
                                                  "train_split": [TRAIN_SPLIT, TRAIN_SEED]}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(FIXTURES))
    p.add_argument("out")
    p.add_argument("--vllm-qe", default=str(Path(sys.executable).with_name("vllm-qe")))
    a = p.parse_args()
    print(f"wrote {build_fixture(a.name, Path(a.out), a.vllm_qe)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
