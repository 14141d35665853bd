"""The accuracy tables: every method x {W4A16, W3A16, W4A8, W4A6, W8A8} on the trained VQA model (dense), and
RTN / GPTQ / VEQ / VEQ+QE x {W4A16, W3A16} on the trained MoE model (`--table moe`).

    python examples/results_table.py --task hard [--eval-samples 2000] [--calib-samples 64]   (runs/vqa-hard)
    python examples/results_table.py [--model runs/vqa-qwen2vl] [--eval-samples 500]   (the basic task)
    python examples/results_table.py --table moe          (model runs/vqa-qwen3vlmoe)

Trains the model first if it is missing (examples/train_vqa.py). Writes docs/results.json, docs/results.md (the
table between its TABLE markers, the text above them kept), docs/results.png and the table between the RESULTS
markers of README.md (MoE: docs/results-moe.{json,md} and the MOE-RESULTS markers). Calibration data: the task's
"calib" split (seed 0; the basic task through `builtin:vqa`, the hard one written as an imagefolder); evaluation:
the held-out "test" split (seed 7, digit images disjoint from training). Every row: stored bits per weight over
the quantized modules (from the checkpoint's files), accuracy, its paired difference to FP, KL and top-1 agreement,
each with a 95 % bootstrap interval over the questions (`vllm_qe.calibration.bootstrap`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (method, params[, other CalibrationConfig fields]); adapters: per-token rank 8 for LQER and QE (QE: 4
# shared + 4 routed of 4 experts). TLQ = GPTQ on the token-importance-weighted Hessian (gradnorm, the default).
QE_R44 = {"k": 8, "num_routed": 4, "shared_rank": 4, "routed_rank": 4}
METHODS: dict[str, tuple] = {
    "RTN": ("rtn", {}),
    "SmoothQuant": ("smoothquant", {}),
    "AWQ": ("awq", {}),
    "GPTQ": ("gptq", {}),
    "MBQ": ("mbq", {}),
    "LQER (r=8)": ("lqer", {"rank": 8}),
    "QE (r=4+4)": ("qe", {"k": 8, "num_routed": 4, "shared_rank": 4, "routed_rank": 4}),
    "QE+GPTQ (r=4+4)": ("qe", {**QE_R44, "base": "gptq"}),
    "QE (default)": ("qe", {}),  # the CLI default: base measured per group, 0.25 bpw for adapters + smoothing
    "TLQ": ("gptq", {}, {"token_importance": "gradnorm"}),
    "TLQ+QE (r=4+4)": ("qe", {**QE_R44, "base": "gptq"}, {"token_importance": "gradnorm"}),
}
# The MoE table (tiny Qwen3-VL-MoE, 8 experts, top-2): experts are weight-only; QE adds a rank-8 shared expert
# per expert projection (and QE's r=4+4 on attention / vision layers).
MOE_METHODS: dict[str, tuple] = {
    "RTN": ("rtn", {}),
    "GPTQ": ("gptq", {}),
    "VEQ-MA": ("veq", {"mode": "ma"}),
    "VEQ-ME": ("veq", {"mode": "me"}),
    "VEQ-ME+MA": ("veq", {"mode": "me+ma"}),
    "VEQ+QE": ("qe", {**QE_R44, "base": "veq", "expert_rank": 8}),
}
# group 128 (VEQ's setting [I]; one group per row of these 128/96-wide experts): at group 32 no method moves this
# model's accuracy, so the table would not separate them.
MOE_SETTINGS: dict[str, tuple[int, int | None, int, bool]] = {
    "W4A16 g128": (4, None, 128, False),
    "W3A16 g128": (3, None, 128, False),
}
# setting -> (wbits, abits, group_size, symmetric). Weight-only: group-wise asymmetric (group 32 on this
# 128-wide model); W+A: per-channel symmetric weights, per-token symmetric activations (MBQ's convention).
SETTINGS: dict[str, tuple[int, int | None, int, bool]] = {
    "W4A16": (4, None, 32, False),
    "W3A16": (3, None, 32, False),
    "W4A8": (4, 8, -1, True),
    "W4A6": (4, 6, -1, True),
    "W8A8": (8, 8, -1, True),
}


# examples/train_vqa.py --task hard's settings (the model the lead's table uses).
HARD_TRAINING = {"steps": 1000, "batch_size": 32, "n_train": 100_000, "lr": 3e-3, "log_every": 25}


def bits_per_weight(ckpt: Path) -> float:
    """Stored bits per weight over the quantized modules: the checkpoint's `quantization_config.storage` record,
    else counted from its safetensors files (`inspect_checkpoint`)."""
    cfg = json.loads((ckpt / "config.json").read_text()).get("quantization_config", {})
    if "bits_per_weight" in cfg.get("storage", {}):
        return float(cfg["storage"]["bits_per_weight"])
    from vllm_qe.format.checkpoint import inspect_checkpoint

    return inspect_checkpoint(ckpt).storage.bits_per_weight()


def adapter_cost(ckpt: Path) -> tuple[float, float]:
    """(extra bytes %, extra FLOPs per token %) of the adapters + router over the low-bit linear layers."""
    from vllm_qe.format.checkpoint import inspect_checkpoint

    s = inspect_checkpoint(ckpt)
    base_flops = extra_flops = 0
    for name, (out_f, in_f) in s.modules.items():
        a = s.config.module_scheme(name).adapters  # MoE experts: their own (shared-only) adapters
        base_flops += 2 * out_f * in_f
        extra_flops += 2 * a.shared_rank * (in_f + out_f)
        if a.num_routed:
            extra_flops += 2 * a.routed_rank * (in_f + out_f) + 2 * a.num_routed * in_f
    return 100 * s.adapter_bytes / max(s.quantized_bytes, 1), 100 * extra_flops / base_flops


def total_steps(log: dict) -> int:
    """Training steps of a model, counting the runs it was initialised from (`previous` in training_log.json)."""
    return log["steps"] + (total_steps(log["previous"]) if "previous" in log else 0)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--table", choices=["dense", "moe"], default="dense")
    p.add_argument("--task", choices=["basic", "hard"], default=None,
                   help="generated VQA task (default: the one --model was trained on; basic without --model)")
    p.add_argument("--model", default=None, help="default: runs/vqa-qwen2vl (dense), runs/vqa-hard (--task hard), "
                                                 "runs/vqa-qwen3vlmoe (moe)")
    p.add_argument("--eval-samples", type=int, default=None, help="default: 2000 (hard task), 500 (basic)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--settings", nargs="+", default=None)
    p.add_argument("--work", default=str(ROOT / "runs" / "results"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on an oversubscribed CPU more threads are many times slower)")
    a = p.parse_args()
    moe = a.table == "moe"
    methods = MOE_METHODS if moe else METHODS
    a.methods = a.methods or list(methods)
    a.settings = a.settings or list(MOE_SETTINGS if moe else SETTINGS)
    default_model = "vqa-qwen3vlmoe" if moe else ("vqa-hard" if a.task == "hard" else "vqa-qwen2vl")
    a.model = a.model or str(ROOT / "runs" / default_model)

    import torch

    from vllm_qe.calibration.api import CalibrationConfig, calibrate
    from vllm_qe.calibration.data import BUILTIN
    from vllm_qe.calibration.evaluate import evaluate_dirs
    from vllm_qe.testing.train_vqa import train_vqa_model
    from vllm_qe.testing.vqa import model_task, task_module

    torch.set_num_threads(a.threads)
    model = Path(a.model)
    if not (model / "config.json").exists():
        print(f"training the VQA model into {model} ...", flush=True)
        train_vqa_model(model, arch="qwen3_vl_moe" if moe else "qwen2_vl", task=a.task or "basic",
                        **(HARD_TRAINING if a.task == "hard" else {}))
    task = a.task or model_task(model)
    a.eval_samples = a.eval_samples or (2000 if task == "hard" else 500)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    calib = BUILTIN
    if task != "basic":
        calib = str(work / f"calib-{task}-n{a.calib_samples}")
        if not (Path(calib) / "metadata.jsonl").is_file():
            task_module(task).write_imagefolder(calib, a.calib_samples, seed=0, split="calib")
    out_json = ROOT / "docs" / ("results-moe.json" if moe else "results.json")
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    if results.get("meta", {}).get("model") != model.name or results.get("meta", {}).get("task", "basic") != task:
        results = {}  # another model's rows: start over
    results["meta"] = {"model": model.name, "task": task, "eval_samples": a.eval_samples,
                       "calib_samples": a.calib_samples,
                       "training": total_steps(json.loads((model / "training_log.json").read_text())),
                       "model_path": os.path.relpath(model.resolve(), ROOT)}
    if (model / "outliers.json").is_file():  # examples/outlier_fixture.py's variant: say so in the table
        results["meta"]["outliers"] = {k: v for k, v in json.loads((model / "outliers.json").read_text()).items()
                                       if k != "channels"}
    fp = evaluate_dirs(model, None, n=a.eval_samples, task=task)
    results["FP32"] = {"-": {"accuracy": fp.accuracy, "kl": 0.0, "top1": 1.0, "by_kind": fp.accuracy_by_kind,
                             "bpw": 32.0, "intervals": {"accuracy": fp.intervals["accuracy"]}}}
    print(f"FP32 accuracy {fp.accuracy:.3f} {fp.ci('accuracy')}", flush=True)
    for setting in a.settings:
        wbits, abits, gs, sym = (MOE_SETTINGS if moe else SETTINGS)[setting]
        for name in a.methods:
            method, params, *rest = methods[name]
            extra = rest[0] if rest else {}
            if method == "smoothquant" and abits is None:
                continue  # SmoothQuant is for activation-quantized settings
            ckpt = work / f"{method}-{setting}-{abs(hash(json.dumps([params, extra], sort_keys=True))) % 10**6}"
            t0 = time.time()
            calibrate(model, ckpt, CalibrationConfig(method=method, wbits=wbits, abits=abits, group_size=gs,
                                                     symmetric=sym, num_samples=a.calib_samples, calib=calib,
                                                     method_params=params, **extra), overwrite=True,
                      progress=False)
            secs = time.time() - t0
            r = evaluate_dirs(model, ckpt, n=a.eval_samples, task=task)
            snr = sorted(r.layer_snr_db.values())
            moe_snr = [v for k, v in r.layer_snr_db.items() if k.endswith(".experts")]
            extra_bytes, extra_flops = adapter_cost(ckpt)
            results.setdefault(name, {})[setting] = {
                "accuracy": r.accuracy, "kl": r.kl, "top1": r.top1, "by_kind": r.accuracy_by_kind,
                "fp_accuracy": r.fp_accuracy, "intervals": r.intervals, "bpw": bits_per_weight(ckpt),
                "median_layer_snr_db": snr[len(snr) // 2], "calib_seconds": round(secs, 1),
                "adapter_bytes_pct": extra_bytes, "adapter_flops_pct": extra_flops,
            }
            if moe_snr:
                results[name][setting]["moe_snr_db"] = sum(moe_snr) / len(moe_snr)
            print(f"{setting:6s} {name:18s} acc {r.accuracy:.3f} {r.ci('accuracy')}  "
                  f"d {r.accuracy - r.fp_accuracy:+.3f} {r.ci('accuracy_delta')}  KL {r.kl:.4f}  top1 {r.top1:.3f}  "
                  f"SNR {snr[len(snr) // 2]:.1f} dB  ({secs:.0f} s)", flush=True)
            out_json.write_text(json.dumps(results, indent=1))
            shutil.rmtree(ckpt, ignore_errors=True)
    write_reports(results, moe)
    return 0


def _kl(v: float) -> str:
    """KL in nats: 4 decimals, or 2 significant digits below 0.001 (so small values do not print as 0.0000)."""
    return f"{v:.4f}" if v >= 1e-3 or v == 0 else f"{v:.1e}"


def _ci(r: dict, key: str, digits: int = 3, scale: float = 1.0) -> str:
    iv = r.get("intervals", {}).get(key)
    if iv is not None and key == "kl":
        return f" [{_kl(iv[0])}, {_kl(iv[1])}]"
    return "" if iv is None else f" [{iv[0] * scale:.{digits}f}, {iv[1] * scale:.{digits}f}]"


def _row(name: str, setting: str, r: dict) -> str:
    """One table row: bpw, accuracy, paired difference to FP, KL, top-1 (each with its 95 % interval)."""
    delta = r["accuracy"] - r.get("fp_accuracy", r["accuracy"])
    cost = f"+{r['adapter_bytes_pct']:.0f}% / +{r['adapter_flops_pct']:.0f}%" if r.get("adapter_bytes_pct") else "-"
    snr = f"; {r['moe_snr_db']:.1f} dB" if "moe_snr_db" in r else ""
    bpw = f"{r['bpw']:.2f}" if "bpw" in r else "n/a"
    return (f"| {name} | {setting} | {bpw} | {_kl(r['kl'])}{_ci(r, 'kl')} | {r['top1']:.3f}{_ci(r, 'top1')} | "
            f"{r['accuracy']:.3f}{_ci(r, 'accuracy')} | {delta:+.3f}{_ci(r, 'accuracy_delta')}{snr} | {cost} |")


def write_reports(results: dict, moe: bool = False) -> None:
    all_settings = MOE_SETTINGS if moe else SETTINGS
    settings = [s for s in all_settings if any(s in v for k, v in results.items() if k not in ("meta", "FP32"))]
    methods = [m for m in (MOE_METHODS if moe else METHODS) if m in results]
    meta = results["meta"]
    fp = results["FP32"]["-"]
    task = meta.get("task", "basic")
    model_desc = "Qwen3-VL-MoE (8 experts, top-2)" if moe else "Qwen2-VL"
    flags = " --table moe" if moe else (" --task hard" if task == "hard" else "")
    if meta.get("model_path"):  # the command that gives this table: its model and the rows it holds
        flags = (f" --model {meta['model_path']} --eval-samples {meta['eval_samples']} --calib-samples "
                 f"{meta['calib_samples']} --settings {' '.join(settings)} --methods "
                 + " ".join(shlex.quote(m) for m in methods))
    out = meta.get("outliers")
    variant = (f", then given activation outliers without changing its function (`examples/outlier_fixture.py`: "
               f"{out['fraction']:.0%} of the channels per norm and MLP x{out['scale']:g}, seed {out['seed']})"
               if out else "")
    lines = [
        f"{meta['eval_samples']} held-out questions of the {task} generated VQA task; {meta['calib_samples']} "
        f"calibration samples. Model: tiny {model_desc} trained here ({meta['training']} steps){variant}. "
        "Columns: stored "
        "bits per weight over the quantized modules (packed weights, scales, zeros, smoothing, adapters, router), "
        "next-token KL(FP || Q) in nats and top-1 agreement with FP over the answer positions, exact-match "
        "accuracy, and its paired difference to FP on the same questions; [95 % bootstrap intervals, questions "
        f"resampled]{'; last column also: mean SNR of the MoE layers' if moe else ''}. "
        f"Regenerate: `python examples/results_table.py{flags}`.",
        "",
        "| method | setting | bpw | KL (nats) | top-1 agreement | accuracy | vs FP | adapter bytes / FLOPs |",
        "|---|---|---|---|---|---|---|---|",
        f"| FP32 | - | 32 | 0 | 1 | {fp['accuracy']:.3f}{_ci(fp, 'accuracy')} | - | - |",
    ]
    for s in settings:
        lines += [_row(m, s, results[m][s]) for m in methods if s in results[m]]
    table = "\n".join(lines)
    path = ROOT / "docs" / ("results-moe.md" if moe else "results.md")
    old = path.read_text() if path.exists() else ""
    if "<!-- TABLE:BEGIN -->" in old:  # keep the text around the markers
        path.write_text(re.sub(r"(<!-- TABLE:BEGIN -->\n).*?(\n<!-- TABLE:END -->)",
                               lambda mt: mt.group(1) + table + mt.group(2), old, flags=re.S))
    else:
        path.write_text("# Results\n\n<!-- TABLE:BEGIN -->\n" + table + "\n<!-- TABLE:END -->\n")
    readme = ROOT / "README.md"
    marker = "MOE-RESULTS" if moe else "RESULTS"
    if readme.exists():
        text = readme.read_text()
        new = re.sub(rf"(<!-- {marker}:BEGIN -->\n).*?(\n<!-- {marker}:END -->)", lambda mt: mt.group(1) + table +
                     mt.group(2), text, flags=re.S)
        readme.write_text(new)
    if moe:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for m in methods:
            xs = [s for s in settings if s in results[m]]
            ax.plot(xs, [results[m][s]["accuracy"] for s in xs], marker="o", label=m)
        ax.axhline(fp["accuracy"], color="black", linestyle="--", label="FP32")
        ax.set_ylabel("VQA accuracy")
        ax.set_title("Accuracy vs setting (tiny Qwen2-VL trained on the generated VQA task)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "results.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
