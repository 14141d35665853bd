"""Bit-identity check of calibration checkpoints across two versions of the code (a refactor must not change them).

    # 1. checkpoints of every case with the code on the import path (run once per version):
    python scripts/compare_checkpoints.py make OUT_DIR [--models DIR] [--cases rtn,gptq_tlq,...]
    # 2. compare two such folders: every tensor bit for bit, the quantization_config keys of the reference,
    #    the sharded index and the report's input groups / per-layer errors:
    python scripts/compare_checkpoints.py compare REF_DIR NEW_DIR

To produce the reference with an older commit, check it out in a worktree and put a folder in front of the
editable install whose `vllm_qe` package links that worktree's three folders, e.g. for 95ce1d1:

    git worktree add --detach /tmp/base 95ce1d1
    mkdir -p /tmp/basepkg/vllm_qe && cd /tmp/basepkg/vllm_qe && ln -s /tmp/base/vllm_qe/* . \\
        && ln -s /tmp/base/calibration calibration && ln -s /tmp/base/kernels kernels
    PYTHONPATH=/tmp/basepkg .venv/bin/python scripts/compare_checkpoints.py make /tmp/cmp/base --models /tmp/cmp/models

(the editable finder is appended to `sys.meta_path`, so `PYTHONPATH` wins). Both runs must share `--models`
(the tiny models are random-init; built once by whichever version runs first).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

QE_SMALL = {"k": 8, "num_routed": 4, "shared_rank": 8, "routed_rank": 8}

# name -> (architecture, CalibrationConfig fields). group_size 32, 8 samples unless given.
CASES: dict[str, tuple[str, dict]] = {
    "rtn": ("qwen2_vl", {"method": "rtn", "wbits": 4, "abits": 8}),
    "rtn_moe": ("qwen3_vl_moe", {"method": "rtn", "wbits": 4}),
    "gptq_tlq": ("qwen2_vl", {"method": "gptq", "wbits": 4, "token_importance": "gradnorm"}),
    "gptq_first_order": ("qwen2_5_vl", {"method": "gptq", "wbits": 3, "token_importance": "first_order"}),
    "gptq_fp_propagate": ("llava", {"method": "gptq", "wbits": 4, "propagate": "fp",
                                    "method_params": {"damp": 0.05}}),
    "smoothquant": ("qwen2_vl", {"method": "smoothquant", "wbits": 4, "abits": 8, "method_params": {"alpha": 0.6}}),
    "awq": ("llava", {"method": "awq", "wbits": 4, "abits": 8}),
    "awq_gptq": ("qwen2_vl", {"method": "awq", "wbits": 3, "method_params": {"base": "gptq", "grid": 10}}),
    "mbq": ("qwen2_vl", {"method": "mbq", "wbits": 4, "abits": 8}),
    "lqer_gptq": ("qwen2_vl", {"method": "lqer", "wbits": 3, "method_params": {"base": "gptq", "rank": 8}}),
    "qe": ("llava", {"method": "qe", "wbits": 4, "abits": 8, "method_params": QE_SMALL}),
    "qe_gptq_tlq": ("qwen2_vl", {"method": "qe", "wbits": 3, "token_importance": "gradnorm",
                                 "method_params": {**QE_SMALL, "base": "gptq"}}),
    "qe_awq": ("qwen2_vl", {"method": "qe", "wbits": 4, "abits": 8, "method_params": {**QE_SMALL, "base": "awq"}}),
    "veq_me_ma_moe": ("qwen3_vl_moe", {"method": "veq", "wbits": 4, "method_params": {"mode": "me+ma"}}),
    "veq_ma_moe": ("qwen3_vl_moe", {"method": "veq", "wbits": 3}),
    "veq_me_moe": ("qwen3_vl_moe", {"method": "veq", "wbits": 4, "method_params": {"mode": "me"}}),
    "qe_veq_moe": ("qwen3_vl_moe", {"method": "qe", "wbits": 4, "method_params": {**QE_SMALL, "base": "veq"}}),
    "gptq_moe_spill": ("qwen3_vl_moe", {"method": "gptq", "wbits": 4, "max_activation_mib": 0}),
    "offload_gptq_tlq": ("qwen2_vl", {"method": "gptq", "wbits": 4, "token_importance": "gradnorm",
                                      "offload": True}),
    "offload_veq_moe": ("qwen3_vl_moe", {"method": "veq", "wbits": 4, "method_params": {"mode": "me+ma"},
                                         "offload": True}),
    "offload_qe": ("llava", {"method": "qe", "wbits": 4, "abits": 8, "method_params": QE_SMALL, "offload": True}),
}


def _build_tiny_model(arch: str, folder: Path) -> Path:
    try:
        from vllm_qe.testing.tiny_models import build_tiny_model
    except ImportError:  # code from before the fixtures moved out of calibration/
        from vllm_qe.calibration.fixtures.tiny_models import build_tiny_model
    return build_tiny_model(arch, folder)


def make(out: Path, models: Path, cases: list[str]) -> None:
    import os

    os.environ.setdefault("VLLM_QE_CACHE", str(models / "cache"))
    from vllm_qe.calibration.api import CalibrationConfig, calibrate

    out.mkdir(parents=True, exist_ok=True)
    for name in cases:
        arch, fields = CASES[name]
        model = models / arch
        if not (model / "config.json").is_file():
            _build_tiny_model(arch, model)
        target = out / name
        if (target / "config.json").is_file():
            print(f"{name}: exists, skipped")
            continue
        cfg = CalibrationConfig(**{"group_size": 32, "num_samples": 8, **fields})
        t0 = time.time()
        calibrate(model, target, cfg, progress=False, resume=False)
        print(f"{name}: {time.time() - t0:.1f} s", flush=True)


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare_one(ref: Path, new: Path) -> list[str]:
    """Differences between two checkpoints (empty = bit-identical in everything this change owns)."""
    import torch

    problems = []
    a, b = _tensors(ref), _tensors(new)
    if set(a) != set(b):
        problems.append(f"tensor names differ: only ref {sorted(set(a) - set(b))[:5]}, "
                        f"only new {sorted(set(b) - set(a))[:5]}")
    for k in sorted(set(a) & set(b)):
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            problems.append(f"tensor {k} differs")
    qa = json.loads((ref / "config.json").read_text())["quantization_config"]
    qb = json.loads((new / "config.json").read_text())["quantization_config"]
    for k in qa:  # keys added later by other changes (informational fields) are not compared
        if qa[k] != qb.get(k):
            problems.append(f"quantization_config[{k!r}]: {qa[k]!r} != {qb.get(k)!r}")
    ia, ib = ref / "model.safetensors.index.json", new / "model.safetensors.index.json"
    if ia.is_file() != ib.is_file() or (ia.is_file() and json.loads(ia.read_text())["weight_map"]
                                        != json.loads(ib.read_text())["weight_map"]):
        problems.append("sharded index differs")
    ra = json.loads((ref / "vllm_qe_report.json").read_text())
    rb = json.loads((new / "vllm_qe_report.json").read_text())
    for k in ("input_groups", "layer_rel_error", "num_samples", "world_size", "offload"):
        if ra.get(k) != rb.get(k):
            problems.append(f"report[{k!r}] differs")
    return problems


def compare(ref_root: Path, new_root: Path) -> int:
    names = sorted(p.name for p in ref_root.iterdir() if (p / "config.json").is_file())
    failed = 0
    for name in names:
        new = new_root / name
        if not (new / "config.json").is_file():
            print(f"{name:20s} MISSING in {new_root}")
            failed += 1
            continue
        problems = compare_one(ref_root / name, new)
        n = len(_tensors(new))
        print(f"{name:20s} {'identical' if not problems else 'DIFFERENT'} ({n} tensors)")
        for p in problems[:10]:
            print(f"    {p}")
        failed += bool(problems)
    print(f"{len(names) - failed}/{len(names)} checkpoints bit-identical")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out", type=Path)
    m.add_argument("--models", type=Path, default=Path("/tmp/vllm_qe_compare/models"))
    m.add_argument("--cases", default=",".join(CASES))
    c = sub.add_parser("compare")
    c.add_argument("ref", type=Path)
    c.add_argument("new", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "make":
        make(a.out, a.models, a.cases.split(","))
        return 0
    return compare(a.ref, a.new)


if __name__ == "__main__":
    sys.exit(main())
