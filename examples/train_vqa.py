"""Train the tiny Qwen2-VL VQA model used by the accuracy table (seeded; the recorded 3000-step run took 17 minutes on 2 shared CPU cores, see training_log.json).

    python examples/train_vqa.py --out runs/vqa-qwen2vl [--steps 3000]
    python examples/train_vqa.py --arch qwen3_vl_moe --out runs/vqa-qwen3vlmoe   (the MoE rows)
"""

from __future__ import annotations

import argparse

from vllm_qe.testing.train_vqa import train_vqa_model

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/vqa-qwen2vl")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen3_vl_moe"])
    a = p.parse_args()
    print(f"wrote {train_vqa_model(a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed, arch=a.arch)}")
