"""Peak memory and time of calibration vs depth, in-memory vs `--offload` (weight streaming), on a Qwen2-VL-2B-
shaped model with random weights (widths of the public 2B config; depth chosen here).

    python examples/calibration_memory.py [--depths 2 6 12] [--full] [--method rtn]

`--full` adds the real depth of Qwen2-VL-2B (28 language layers, 32 vision blocks), offload only (the in-memory run
of the whole 2B model in float32 is the thing offload avoids; add it with `--full-in-memory`).

Each run is a fresh `vllm-qe calibrate` process; peak RSS is its `ru_maxrss` (recorded in vllm_qe_report.json).
Writes docs/benchmarks/calibration-memory.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--depths", type=int, nargs="+", default=[2, 6, 12])
    p.add_argument("--method", default="rtn")
    p.add_argument("--work", default=str(ROOT / "runs" / "scale"))
    p.add_argument("--full", action="store_true")
    p.add_argument("--full-in-memory", action="store_true")
    a = p.parse_args()
    from vllm_qe.testing.scale_models import calibrate_in_subprocess, write_random_model

    rows = []
    runs = [(f"{d}", d, d, (False, True)) for d in a.depths]
    if a.full:
        runs.append(("28 / 32 (real 2B)", 28, 32, (False, True) if a.full_in_memory else (True,)))
    for label, text_layers, vision_depth, modes in runs:
        model = Path(a.work) / f"qwen2_vl_2b-{text_layers}-{vision_depth}"
        if not (model / "config.json").exists():
            write_random_model("qwen2_vl_2b", model, text_layers=text_layers, vision_depth=vision_depth)
        for offload in modes:
            peak, secs = calibrate_in_subprocess(model, Path(a.work) / f"q-{text_layers}-{vision_depth}-{int(offload)}",
                                                 a.method, offload)
            rows.append((label, offload, peak, secs))
            print(f"depth {label:>18s}  {'offload  ' if offload else 'in-memory'}  peak RSS {peak:8.0f} MiB  "
                  f"{secs:6.1f} s", flush=True)
    lines = ["# Calibration memory vs depth", "",
             f"Qwen2-VL-2B widths, random weights, `{a.method}`, 4 calibration samples, 2 CPU cores. Depth = language "
             "layers = vision blocks unless stated. Regenerate: `python examples/calibration_memory.py"
             f"{' --full' if a.full else ''}`.", "",
             "| depth (language / vision) | in-memory peak RSS (MiB) | offload peak RSS (MiB) | offload / in-memory time |", "|---|---|---|---|"]
    for label, *_ in runs:
        mem = {o: (p, s) for dd, o, p, s in rows if dd == label}
        inmem = f"{mem[False][0]:.0f}" if False in mem else "not run"
        ratio = f"{mem[True][1] / mem[False][1]:.2f}" if False in mem else f"({mem[True][1]:.0f} s)"
        lines.append(f"| {label} | {inmem} | {mem[True][0]:.0f} | {ratio} |")
    out = ROOT / "docs" / "benchmarks" / "calibration-memory.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
