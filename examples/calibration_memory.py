"""Peak memory and time of calibration vs depth, in-memory vs `--offload` (weight streaming), on a Qwen2-VL-2B-
shaped model with random weights (widths of the public 2B config; depth chosen here).

    python examples/calibration_memory.py [--depths 2 6] [--method rtn]

Each run is a fresh `vllm-qe calibrate` process; peak RSS is its `ru_maxrss` (recorded in vllm_qe_report.json).
Writes docs/benchmarks/calibration-memory.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(model: Path, out: Path, method: str, offload: bool) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "vllm_qe.calibration.cli", "calibrate", str(model), "--out", str(out), "--method",
           method, "--num-samples", "4", "--overwrite", "--quiet", "--no-resume"] + (["--offload"] if offload else [])
    t0 = time.time()
    subprocess.run(cmd, check=True, capture_output=True)
    rep = json.loads((out / "vllm_qe_report.json").read_text())
    return rep["peak_rss_mib"], time.time() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--depths", type=int, nargs="+", default=[2, 6])
    p.add_argument("--method", default="rtn")
    p.add_argument("--work", default=str(ROOT / "runs" / "scale"))
    a = p.parse_args()
    from vllm_qe.calibration.fixtures.scale_models import write_random_model

    rows = []
    for d in a.depths:
        model = Path(a.work) / f"qwen2_vl_2b-{d}"
        if not (model / "config.json").exists():
            write_random_model("qwen2_vl_2b", model, text_layers=d, vision_depth=d)
        for offload in (False, True):
            peak, secs = run(model, Path(a.work) / f"q-{d}-{int(offload)}", a.method, offload)
            rows.append((d, offload, peak, secs))
            print(f"depth {d:3d}  {'offload  ' if offload else 'in-memory'}  peak RSS {peak:8.0f} MiB  {secs:6.1f} s",
                  flush=True)
    lines = ["# Calibration memory vs depth", "",
             f"Qwen2-VL-2B widths, random weights, `{a.method}`, 4 calibration samples, 2 CPU cores. Depth = language "
             "layers = vision blocks. Regenerate: `python examples/calibration_memory.py`.", "",
             "| depth | in-memory peak RSS (MiB) | offload peak RSS (MiB) | offload / in-memory time |", "|---|---|---|---|"]
    for d in a.depths:
        mem = {o: (p, s) for dd, o, p, s in rows if dd == d}
        lines.append(f"| {d} | {mem[False][0]:.0f} | {mem[True][0]:.0f} | {mem[True][1] / mem[False][1]:.2f} |")
    out = ROOT / "docs" / "benchmarks" / "calibration-memory.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
