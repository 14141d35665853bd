"""Control: how far does the end-to-end KL move when only GPTQ's damping changes? (project venv)

    .venv/bin/python benchmarks/peer/damping_control.py FIXTURE SETTING SEED [--damp 0.011] [--work runs/peer]

Not a tuning run (the table uses each tool's defaults): it measures how much of a per-seed difference between the
two tools can come from an arbitrary constant. For one (fixture, setting, calibration seed) that run.py has
done, both tools calibrate again on the same dumped calibration set with the damping fraction changed from 0.01
(both defaults) to --damp (vllm-qe: `--method-params '{"damp": D}'`; llm-compressor: `dampening_frac=D`), and
evaluate.py scores the four checkpoints on the same held-out chats. Outputs under WORK/controls/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import REPO, SETTINGS, layer_plan  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fixture")
    p.add_argument("setting", choices=sorted(SETTINGS))
    p.add_argument("seed", type=int)
    p.add_argument("--damp", type=float, default=0.011)
    p.add_argument("--work", default=str(REPO / "runs" / "peer"))
    p.add_argument("--llmc-venv", default="/work/venvs/llmc")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(a.work).resolve()
    fdir, fwork, out = work / "fixtures" / a.fixture, work / a.fixture, work / "controls"
    bits, gs, sym, _ = SETTINGS[a.setting]
    ignore, _ = layer_plan(fdir, gs)
    calib = fwork / f"calib-builtin-vqa-n32-seed{a.seed}.safetensors"
    q_dirs = [d for d in sorted((fwork / "vllm-qe").glob(f"{a.setting}-*-seed{a.seed}")) if d.is_dir()]
    l_dir = fwork / "llmc" / f"{a.setting}-seed{a.seed}"
    if len(q_dirs) != 1 or not l_dir.is_dir() or not calib.is_file():
        raise SystemExit(f"{fwork}: run run.py for seed {a.seed} first (need one vllm-qe/{a.setting}-*-seed{a.seed}, "
                         f"llmc/{a.setting}-seed{a.seed} and {calib.name})")
    tag = f"{a.fixture}-{a.setting}-seed{a.seed}-damp{a.damp}"
    q_out, l_out = out / f"vllm-qe-{tag}", out / f"llmc-{tag}"
    out.mkdir(parents=True, exist_ok=True)
    cli = [str(REPO / ".venv" / "bin" / "vllm-qe"), "calibrate", str(fdir), "--out", str(q_out), "--method", "gptq",
           "--wbits", str(bits), "--group-size", str(gs), "--method-params", json.dumps({"damp": a.damp}),
           "--calib", "builtin:vqa", "--num-samples", "32", "--seed", str(a.seed), "--overwrite", "--no-resume",
           "--quiet"] + (["--symmetric"] if sym else [])
    for pat in ignore:
        cli += ["--ignore", pat]
    subprocess.run(cli, check=True, cwd=REPO)
    subprocess.run([str(Path(a.llmc_venv) / "bin" / "python"), str(HERE / "llmc_quantize.py"), str(fdir), str(calib),
                    str(l_out), "--wbits", str(bits), "--group-size", str(gs), "--ignore", json.dumps(ignore),
                    "--gptq-args", json.dumps({"dampening_frac": a.damp})] + (["--symmetric"] if sym else []),
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ev = out / f"eval-{tag}.json"
    ev.unlink(missing_ok=True)
    ckpts = {"vllm-qe, damp 0.01 (table)": q_dirs[0], f"vllm-qe, damp {a.damp}": q_out,
             "llm-compressor, damp 0.01 (table)": l_dir, f"llm-compressor, damp {a.damp}": l_out}
    subprocess.run([sys.executable, str(HERE / "evaluate.py"), str(fdir),
                    str(next(fwork.glob("eval-test-seed7-n*.safetensors"))), str(ev)]
                   + [str(c) for c in ckpts.values()], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    res = json.loads(ev.read_text())
    print(f"{a.fixture} {SETTINGS[a.setting][3]}, calibration seed {a.seed}: held-out KL (all positions; text "
          "positions)")
    for name, c in ckpts.items():
        r = res[str(c)]
        print(f"  {name:36s} {sum(r['kl_sum']) / sum(r['positions']):.3g}; "
              f"{sum(r['kl_sum_text']) / sum(r['positions_text']):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
