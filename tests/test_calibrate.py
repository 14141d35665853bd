"""Calibration driver + RTN on tiny real-architecture VLMs (transformers only, no vLLM)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vllm_qe.calibration.algorithms.rtn import RTN
from vllm_qe.calibration.api import CalibrationConfig, calibrate
from vllm_qe.calibration.data import build_inputs
from vllm_qe.calibration.fakequant import FakeQuantLinear, load_fake_quant_model
from vllm_qe.format.checkpoint import inspect_checkpoint, load_tensors, read_qe_config
from vllm_qe.format.quantizer import compute_qparams, fake_quantize_weight


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_rtn_checkpoint_covers_vision_and_language(arch, quantized_dir, tiny_dir):
    out = quantized_dir(arch, "rtn", wbits=4, abits=8)
    summary = inspect_checkpoint(out)
    names = list(summary.modules)
    vision_key = "vision_tower" if arch == "llava" else "visual"
    assert any(vision_key in n for n in names) and any("layers.0.self_attn.q_proj" in n for n in names)
    assert not any("lm_head" in n for n in names)
    # each stored weight is exactly the RTN fake-quantization of the original
    src = load_tensors(tiny_dir(arch))
    q = load_fake_quant_model(out)
    n_checked = 0
    for mod in q.modules():
        if isinstance(mod, FakeQuantLinear):
            n_checked += 1
    assert n_checked == len(names)
    name = names[0]
    w = src[f"{name}.weight"]
    ref = fake_quantize_weight(w, compute_qparams(w, 4, 32, False))
    dq = [m for m in q.modules() if isinstance(m, FakeQuantLinear)]
    assert any(torch.equal(m.weight_deq, ref) for m in dq)
    assert (out / "preprocessor_config.json").exists() or (out / "processor_config.json").exists()


def test_fake_quant_model_runs_and_differs_from_full_precision(quantized_dir, tiny_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vllm_qe.calibration.fixtures.vqa import make_sample

    out = quantized_dir("qwen2_vl", "rtn", wbits=3, abits=None)
    proc = AutoProcessor.from_pretrained(str(out))
    s = make_sample(5, 3, "test")
    inputs = build_inputs(proc, s.image, s.question)
    fp = AutoModelForImageTextToText.from_pretrained(str(tiny_dir("qwen2_vl")), dtype=torch.float32).eval()
    fq = load_fake_quant_model(out)
    with torch.no_grad():
        a, b = fp(**inputs).logits, fq(**inputs).logits
    rel = float((a - b).norm() / a.norm())
    assert 1e-4 < rel < 0.5


def test_no_vision_leaves_vision_tower_in_full_precision(quantized_dir):
    out = quantized_dir("qwen2_vl", "rtn", quantize_vision=False)
    cfg = read_qe_config(out)
    assert cfg.quantized_modules and not any(m.startswith("visual") for m in cfg.quantized_modules)
    assert "visual.blocks.0.attn.qkv" in cfg.ignore


def test_interrupted_calibration_leaves_no_valid_looking_folder(tmp_path, tiny_dir, monkeypatch):
    calls = {"n": 0}
    orig = RTN.quantize_group

    def flaky(self, targets):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return orig(self, targets)

    monkeypatch.setattr(RTN, "quantize_group", flaky)
    with pytest.raises(KeyboardInterrupt):
        calibrate(tiny_dir("qwen2_vl"), tmp_path / "out", CalibrationConfig(group_size=32, num_samples=2),
                  progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_calibrate_and_inspect(tmp_path, tiny_dir):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "vllm_qe.calibration.cli", "calibrate", str(tiny_dir("llava")),
                        "--out", str(out), "--method", "rtn", "--wbits", "4", "--abits", "8", "--group-size", "32",
                        "--num-samples", "2", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "vllm_qe.calibration.cli", "inspect", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "W4A8" in r.stdout


def test_existing_output_is_not_clobbered(tmp_path, tiny_dir):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        calibrate(tiny_dir("qwen2_vl"), tmp_path / "out", CalibrationConfig(num_samples=1), progress=False)
