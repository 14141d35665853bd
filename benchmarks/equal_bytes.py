"""QE against GPTQ at equal bytes: KL to the FP model vs stored bits per weight, on the peer benchmark's fixtures.

Every configuration is calibrated through the CLI on the same fixture, calibration set and layers (the peer
benchmark's layer plan: language-model linears), evaluated with the project's fake-quant model (adapters and
router included: what vLLM serves) against the FP model: full-vocabulary teacher-forced KL over every position
of the held-out chats and top-1 agreement, with 95 % bootstrap intervals over chats; bits per weight are the
checkpoint's own `storage` record (every stored tensor of the quantized modules).

    .venv/bin/python benchmarks/equal_bytes.py            # fixtures from `benchmarks/peer/run.py` (runs/peer)
Writes docs/equal-bytes.md and runs/equal-bytes/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "peer"))

from chats import load_chats  # noqa: E402
from run import layer_plan  # noqa: E402

from vllm_qe.calibration.bootstrap import bootstrap_interval  # noqa: E402

# (label, CLI arguments): GPTQ at two group sizes (their bytes bracket QE's) and QE at budgets in between
CONFIGS: list[tuple[str, list[str]]] = [
    ("GPTQ W4 g128", ["--method", "gptq", "--wbits", "4", "--group-size", "128"]),
    ("GPTQ W4 g32", ["--method", "gptq", "--wbits", "4", "--group-size", "32"]),
    ("QE W4 g128 (default: 0.25 bpw adapters)", ["--method", "qe", "--wbits", "4", "--group-size", "128"]),
    ("QE W4 g128 (0.5 bpw adapters)", ["--method", "qe", "--wbits", "4", "--group-size", "128",
                                       "--method-params", '{"adapter_bpw": 0.5}']),
    ("GPTQ W3 g128", ["--method", "gptq", "--wbits", "3", "--group-size", "128"]),
    ("QE W3 g128 (0.75 bpw adapters)", ["--method", "qe", "--wbits", "3", "--group-size", "128",
                                        "--method-params", '{"adapter_bpw": 0.75}']),
]


def calibrate(fixture: Path, out: Path, args: list[str], ignore: list[str], num_samples: int) -> float:
    cmd = [str(REPO / ".venv" / "bin" / "vllm-qe"), "calibrate", str(fixture), "--out", str(out), "--overwrite",
           "--num-samples", str(num_samples), "--quiet", *args]
    for pat in ignore:
        cmd += ["--ignore", pat]
    t0 = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return time.time() - t0


@torch.no_grad()
def evaluate(fixture: Path, ckpt: Path, chats: list[dict[str, torch.Tensor]],
             fp_logprobs: list[torch.Tensor]) -> dict[str, list[float]]:
    from vllm_qe.calibration.fakequant import load_fake_quant_model

    model = load_fake_quant_model(ckpt)
    kl, top1, n = [], [], []
    for c, a in zip(chats, fp_logprobs):
        b = torch.log_softmax(model(**c).logits[0].double(), -1)
        kl.append(float((a.exp() * (a - b)).sum()))
        top1.append(int((a.argmax(-1) == b.argmax(-1)).sum()))
        n.append(a.shape[0])
    return {"kl_sum": kl, "top1_hits": top1, "positions": n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", default="qwen2_vl-256,qwen2_5_vl-odd")
    p.add_argument("--peer-work", default=str(REPO / "runs" / "peer"))
    p.add_argument("--work", default=str(REPO / "runs" / "equal-bytes"))
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--doc", default=str(REPO / "docs" / "equal-bytes.md"))
    a = p.parse_args()
    from transformers import AutoModelForImageTextToText

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in a.fixtures.split(","):
        fixture = Path(a.peer_work) / "fixtures" / name
        evals = sorted((Path(a.peer_work) / name).glob("eval-*.safetensors"))
        if not fixture.is_dir() or not evals:
            raise SystemExit(f"{fixture}: run benchmarks/peer/run.py first (it builds the fixtures and eval chats)")
        chats = load_chats(evals[0])
        fp = AutoModelForImageTextToText.from_pretrained(str(fixture), dtype=torch.float32).eval()
        with torch.no_grad():
            fp_lp = [torch.log_softmax(fp(**c).logits[0].double(), -1) for c in chats]
        ignore, _ = layer_plan(fixture, 128)  # the same layers for every row (those g128 can quantize)
        for label, args in CONFIGS:
            out = work / name / label.split(" (")[0].replace(" ", "_") / (args[-1] if "--method-params" in args else "default")
            seconds = calibrate(fixture, out, args, ignore, a.num_samples)
            r = evaluate(fixture, out, chats, fp_lp)
            storage = json.loads((out / "config.json").read_text())["quantization_config"]["storage"]
            r.update(bpw=storage["bits_per_weight"], seconds=round(seconds, 1), args=args)
            results[f"{name} | {label}"] = r
            kl = sum(r["kl_sum"]) / sum(r["positions"])
            print(f"{name:16s} {label:42s} bpw {r['bpw']:.3f}  KL {kl:.3e}  top-1 "
                  f"{sum(r['top1_hits']) / sum(r['positions']):.4f}", flush=True)
            (work / "results.json").write_text(json.dumps(results, indent=1))
    write_doc(results, Path(a.doc))
    return 0


def write_doc(results: dict[str, dict], doc: Path) -> None:
    rows = []
    for key, r in results.items():
        name, label = key.split(" | ")
        kl_num, top_num, den = (torch.tensor(r[k], dtype=torch.float64) for k in ("kl_sum", "top1_hits", "positions"))
        kl = float(kl_num.sum() / den.sum())
        lo, hi = bootstrap_interval(kl_num, den)
        t1 = float(top_num.sum() / den.sum())
        rows.append(f"| {name} | {label} | {r['bpw']:.3f} | {kl:.3g} [{lo:.3g}, {hi:.3g}] | {100 * t1:.1f} % |")
    doc.write_text("\n".join([
        "# QE vs GPTQ at equal bytes",
        "",
        "Regenerate: `.venv/bin/python benchmarks/equal_bytes.py` (after `benchmarks/peer/run.py` has built the "
        "fixtures; about 20 min on 2 shared cores).",
        "",
        "Same fixtures, calibration set (32 built-in image+text chats) and layers (the language-model linears of "
        "the peer benchmark) for every row; asymmetric weights; evaluated with the project's fake-quant model "
        "(adapters and router included) against the FP model: KL(P_FP || P_Q) in nats over every position of the "
        "held-out chats (full vocabulary, teacher-forced) with a 95 % bootstrap interval over chats, and top-1 "
        "agreement. Bits per weight: the checkpoint's `storage` record (packed weights, scales, zero points, "
        "adapters and router as stored).",
        "",
        "| fixture | configuration | bits/weight | KL [95 % CI] | top-1 |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]))


if __name__ == "__main__":
    sys.exit(main())
