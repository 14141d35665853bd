"""Ablations of the choices the papers leave open ([I] in docs/algorithms.md), on the trained VQA model.

    python examples/ablations.py [--model runs/vqa-qwen2vl] [--eval-samples 500]

Writes docs/ablations.json and docs/ablations.md. Each row changes one thing against its reference row.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QE = {"k": 8, "num_routed": 4, "shared_rank": 4, "routed_rank": 4}

# name -> (setting, CalibrationConfig overrides)
ROWS: dict[str, tuple[str, dict]] = {
    "GPTQ (reference)": ("W3A16", {"method": "gptq"}),
    "GPTQ, full-precision propagation": ("W3A16", {"method": "gptq", "propagate": "fp"}),
    "GPTQ + TLQ gradnorm": ("W3A16", {"method": "gptq", "token_importance": "gradnorm"}),
    "GPTQ + TLQ first-order": ("W3A16", {"method": "gptq", "token_importance": "first_order"}),
    "QE (reference)": ("W3A16", {"method": "qe", "method_params": QE}),
    "QE, routed fit on the global Gram only": ("W3A16", {"method": "qe", "method_params": {**QE, "mix": 1e6}}),
    "QE, C_s columns quantized (no exemption)": ("W3A16", {"method": "qe",
                                                           "method_params": {**QE, "exempt_shared": False}}),
    "QE, shared expert only (rank 8)": ("W3A16", {"method": "qe", "method_params": {**QE, "num_routed": 0,
                                                                                    "shared_rank": 8}}),
    "QE + TLQ gradnorm": ("W3A16", {"method": "qe", "method_params": QE, "token_importance": "gradnorm"}),
    "QE + AdamW refinement (200 steps)": ("W3A16", {"method": "qe",
                                                    "method_params": {**QE, "refine_steps": 200}}),
    "QE W4A6 (reference)": ("W4A6", {"method": "qe", "method_params": QE}),
    "QE W4A6, AWQ base": ("W4A6", {"method": "qe", "method_params": {**QE, "base": "awq"}}),
    "QE W4A6, no smoothing (RTN base)": ("W4A6", {"method": "qe", "method_params": {**QE, "base": "rtn"}}),
    "QE W4A6, shared expert only (rank 8)": ("W4A6", {"method": "qe", "method_params": {**QE, "num_routed": 0,
                                                                                       "shared_rank": 8}}),
    "QE W4A6, routed fit on the global Gram only": ("W4A6", {"method": "qe", "method_params": {**QE, "mix": 1e6}}),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(ROOT / "runs" / "vqa-qwen2vl"))
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--rows", nargs="+", default=list(ROWS))
    a = p.parse_args()

    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    from results_table import SETTINGS

    from vllm_qe.calibration.api import CalibrationConfig, calibrate
    from vllm_qe.calibration.evaluate import evaluate_dirs

    out_json = ROOT / "docs" / "ablations.json"
    res = json.loads(out_json.read_text()) if out_json.exists() else {}
    work = ROOT / "runs" / "ablations"
    for name in a.rows:
        setting, over = ROWS[name]
        wbits, abits, gs, sym = SETTINGS[setting]
        ckpt = work / "ckpt"
        cfg = CalibrationConfig(wbits=wbits, abits=abits, group_size=gs, symmetric=sym, num_samples=a.calib_samples,
                                **over)
        calibrate(a.model, ckpt, cfg, overwrite=True, progress=False)
        r = evaluate_dirs(a.model, ckpt, n=a.eval_samples)
        res[name] = {"setting": setting, "accuracy": r.accuracy, "kl": r.kl, "top1": r.top1}
        print(f"{name:45s} {setting}  acc {r.accuracy:.3f}  KL {r.kl:.4f}  top1 {r.top1:.3f}", flush=True)
        out_json.write_text(json.dumps(res, indent=1))
        shutil.rmtree(ckpt, ignore_errors=True)
    lines = ["# Ablations", "", f"Trained tiny Qwen2-VL, {a.eval_samples} held-out questions, {a.calib_samples} "
             "calibration samples. Regenerate: `python examples/ablations.py`.", "",
             "| variant | setting | accuracy | KL (nats) | top-1 agreement |", "|---|---|---|---|---|"]
    for name in ROWS:
        if name in res:
            r = res[name]
            lines.append(f"| {name} | {r['setting']} | {r['accuracy']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} |")
    (ROOT / "docs" / "ablations.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
