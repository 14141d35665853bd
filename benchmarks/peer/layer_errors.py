"""The layer-wise yardstick for every (fixture, setting, seed) of a run.py run (project venv).

    .venv/bin/python benchmarks/peer/layer_errors.py [--work runs/peer]

For each checkpoint pair run.py left (vllm-qe `vllm-qe/<setting>-<tag>-seed<S>`, llm-compressor
`llmc/<setting>-seed<S>`), every quantized module's relative H-weighted weight error
tr(dW H dW^T) / tr(W H W^T), with H = X^T X of the FP model's inputs to that module over the held-out chats
(the same for both tools: not the propagated inputs each tool calibrated on). Prints a markdown table: per
(fixture, setting, seed) the geometric mean over modules of the ratio vllm-qe / llm-compressor and its range,
and per (fixture, setting) the geometric mean over seeds. Low noise and what GPTQ minimises, unlike the
end-to-end KL (see docs/peer-comparison.md).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chats import load_chats  # noqa: E402
from diagnose import input_grams, rel_error  # noqa: E402
from evaluate import read_checkpoint, tail  # noqa: E402
from run import REPO, SETTINGS  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(REPO / "runs" / "peer"))
    a = p.parse_args()
    from transformers import AutoModelForImageTextToText

    work = Path(a.work)
    print("| fixture | setting | seed | modules | layer-error ratio vllm-qe / llmc, geometric mean [min, max] |")
    print("|---|---|---|---|---|")
    per_row: dict[tuple[str, str], list[float]] = {}
    for fdir in sorted((work / "fixtures").iterdir()):
        fwork = work / fdir.name
        if not (fwork / "llmc").is_dir():
            continue
        fp = AutoModelForImageTextToText.from_pretrained(str(fdir), dtype=torch.float32).eval()
        w_fp = {tail(n): m.weight.detach().double() for n, m in fp.named_modules()
                if isinstance(m, torch.nn.Linear) and "visual" not in n and re.search(r"layers\.\d+\.", n)}
        grams = input_grams(fp, set(w_fp), load_chats(next(fwork.glob("eval-test-seed7-n*.safetensors"))))
        for st in SETTINGS:
            for l_dir in sorted((fwork / "llmc").glob(f"{st}-seed*")):
                seed = l_dir.name.rsplit("seed", 1)[1]
                q_dirs = [d for d in sorted((fwork / "vllm-qe").glob(f"{st}-*-seed{seed}")) if d.is_dir()]
                if len(q_dirs) != 1:
                    continue
                wq = {tail(k): v for k, v in read_checkpoint(q_dirs[0])[1].items()}
                wl = {tail(k): v for k, v in read_checkpoint(l_dir)[1].items()}
                if wq.keys() != wl.keys():
                    raise SystemExit(f"{fdir.name} {st} seed {seed}: the checkpoints quantize different modules")
                logs = [math.log(rel_error(wq[t], w_fp[t], grams[t]) / rel_error(wl[t], w_fp[t], grams[t]))
                        for t in wq]
                g = math.exp(sum(logs) / len(logs))
                per_row.setdefault((fdir.name, st), []).append(g)
                print(f"| {fdir.name} | {SETTINGS[st][3]} | {seed} | {len(logs)} | {g:.3f} "
                      f"[{math.exp(min(logs)):.2f}, {math.exp(max(logs)):.2f}] |")
    print("\n| fixture | setting | seeds | layer-error ratio vllm-qe / llmc, geometric mean over seeds |")
    print("|---|---|---|---|")
    for (fx, st), gs in per_row.items():
        print(f"| {fx} | {SETTINGS[st][3]} | {len(gs)} | {math.exp(sum(map(math.log, gs)) / len(gs)):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
