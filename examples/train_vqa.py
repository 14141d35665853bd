"""Train a tiny Qwen2-VL VQA model used by the accuracy tables (seeded; one torch thread by default).

    python examples/train_vqa.py --out runs/vqa-qwen2vl [--steps 3000]      (basic task; 17 min on 2 idle cores)
    python examples/train_vqa.py --task hard --out runs/vqa-hard            (hard task: 1000 steps, lr 3e-3,
                                                                              fresh samples; see its training_log)
    python examples/train_vqa.py --arch qwen3_vl_moe --out runs/vqa-qwen3vlmoe   (the MoE rows)

On a shared, oversubscribed CPU keep `--threads 1`: with 2 threads a training step measured ~10x slower.
"""

from __future__ import annotations

import argparse

import torch

from vllm_qe.testing.train_vqa import train_vqa_model

# Per task: steps, lr, distinct training samples, log interval (the defaults of the recorded runs).
PRESETS = {"basic": dict(steps=3000, lr=2e-3, n_train=4000, log_every=100),
           "hard": dict(steps=1000, lr=3e-3, n_train=100_000, log_every=25)}

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="basic", choices=list(PRESETS))
    p.add_argument("--out", default=None, help="default: runs/vqa-qwen2vl (basic), runs/vqa-hard (hard)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init-from", default=None, help="continue training from this trained model folder")
    p.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen3_vl_moe"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    kw = dict(PRESETS[a.task])
    kw.update({k: v for k, v in (("steps", a.steps), ("lr", a.lr)) if v is not None})
    out = a.out or ("runs/vqa-hard" if a.task == "hard" else "runs/vqa-qwen2vl")
    path = train_vqa_model(out, batch_size=a.batch_size, seed=a.seed, arch=a.arch, task=a.task,
                           init_from=a.init_from, **kw)
    print(f"wrote {path}")
