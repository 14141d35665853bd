"""Calibration over 2 gloo ranks (torchrun) against the single-process run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from vllm_qe.format.checkpoint import load_tensors

QE = json.dumps({"k": 8, "num_routed": 4, "shared_rank": 4, "routed_rank": 4})


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calibrate(model, out, args, ranks: int) -> None:
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     f"--nproc-per-node={ranks}", f"--master-port={_port()}"]
    cmd = launcher + ["-m", "vllm_qe.cli", "calibrate", str(model), "--out", str(out), "--group-size",
                      "32", "--num-samples", "4", "--quiet", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _logit_gap(one, two) -> float:
    """Relative logit difference of two checkpoints' fake-quant models on one held-out VQA sample."""
    from transformers import AutoProcessor

    from vllm_qe.calibration.data import build_inputs
    from vllm_qe.calibration.fakequant import load_fake_quant_model
    from vllm_qe.testing.vqa import make_sample

    proc = AutoProcessor.from_pretrained(str(one))
    s = make_sample(1, 1, "test")
    x = build_inputs(proc, s.image, s.question, s.answer)
    with torch.no_grad():
        la = load_fake_quant_model(one)(**x).logits
        lb = load_fake_quant_model(two)(**x).logits
    return float((la - lb).norm() / la.norm())


def test_two_ranks_gptq_checkpoint_is_bit_identical(tiny_dir, tmp_path):
    _calibrate(tiny_dir("qwen2_vl"), tmp_path / "one", ["--method", "gptq"], 1)
    _calibrate(tiny_dir("qwen2_vl"), tmp_path / "two", ["--method", "gptq"], 2)
    a, b = load_tensors(tmp_path / "one"), load_tensors(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "two" / "vllm_qe_report.json").read_text())
    assert report["world_size"] == 2


@pytest.mark.slow
def test_two_ranks_qe_checkpoint_matches_within_tolerance(tiny_dir, tmp_path):
    """QE: float summation order differs between 1 and 2 ranks; it can move a k-means assignment or a rounding
    decision, so the checkpoints are compared in function space: logits within 1 %."""
    args = ["--method", "qe", "--method-params", QE, "--abits", "8"]
    _calibrate(tiny_dir("qwen2_vl"), tmp_path / "one", args, 1)
    _calibrate(tiny_dir("qwen2_vl"), tmp_path / "two", args, 2)
    assert _logit_gap(tmp_path / "one", tmp_path / "two") < 0.01


@pytest.mark.slow
def test_two_ranks_moe_veq_checkpoint_matches_within_tolerance(tiny_dir, tmp_path):
    """MoE + VEQ-ME+MA over 2 ranks: per-expert statistics, routing counts and gradient sums (γ) are all-reduced;
    summation order and the reservoir's sample order differ, so the checkpoints agree in function space."""
    args = ["--method", "veq", "--method-params", json.dumps({"mode": "me+ma"}), "--wbits", "3"]
    _calibrate(tiny_dir("qwen3_vl_moe"), tmp_path / "one", args, 1)
    _calibrate(tiny_dir("qwen3_vl_moe"), tmp_path / "two", args, 2)
    assert _logit_gap(tmp_path / "one", tmp_path / "two") < 0.02
