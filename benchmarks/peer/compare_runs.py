"""vllm-qe against vllm-qe: two run.py runs of the same fixtures and seeds with different vllm-qe options.

    .venv/bin/python benchmarks/peer/compare_runs.py runs/peer-clip/summary.json runs/peer/summary.json

Prints, per (fixture, setting) present in both runs, the KL ratio of run A's vllm-qe checkpoints over run B's
(geometric mean over the seeds both runs have, 95 % interval over seeds and held-out chats: run.py's paired
two-level bootstrap) and, beside it, each run's ratio to llm-compressor. Valid because run.py scores every
checkpoint of a seed on the same held-out chats (the bootstrap checks that the positions agree).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import SETTINGS, bootstrap, fmt_ci  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", help="summary.json of run A (e.g. --vllm-qe-args '--clip mse')")
    p.add_argument("run_b", help="summary.json of run B (the reference)")
    p.add_argument("--part", default="", choices=["", "_text"], help="'_text': text positions only")
    a = p.parse_args()
    sa, sb = (json.loads(Path(x).read_text()) for x in (a.run_a, a.run_b))
    print(f"A: {sa['cmd']}  (started {sa['started']})\nB: {sb['cmd']}  (started {sb['started']})\n")
    print("| fixture | setting | seeds | KL ratio vllm-qe A / vllm-qe B [95 % CI] | A / llmc | B / llmc |")
    print("|---|---|---|---|---|---|")
    for fx, per_a in sa["results"].items():
        per_b = sb["results"].get(fx, {})
        for st in SETTINGS:
            if st not in per_a or st not in per_b:
                continue
            seeds = sorted(set(per_a[st]) & set(per_b[st]), key=int)
            if not seeds:
                continue
            ea, eb = [per_a[st][s] for s in seeds], [per_b[st][s] for s in seeds]
            ab = bootstrap([e["vllm_qe"] for e in ea], [e["vllm_qe"] for e in eb], part=a.part)
            al = bootstrap([e["vllm_qe"] for e in ea], [e["llmc"] for e in ea], part=a.part)
            bl = bootstrap([e["vllm_qe"] for e in eb], [e["llmc"] for e in eb], part=a.part)

            def cell(r: dict) -> str:
                if r["ratio"] is None:
                    return "n/a"
                ci = r.get("ratio_ci")
                return f"{r['ratio']:.2f}" + (f" {fmt_ci(ci, 2)}" if ci else "")

            print(f"| {fx} | {SETTINGS[st][3]} | {','.join(seeds)} | **{cell(ab)}** | {cell(al)} | {cell(bl)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
