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


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_layers_reading_one_input_are_grouped_and_no_others(arch, quantized_dir):
    import json

    out = quantized_dir(arch, "rtn", wbits=4, abits=8)
    groups = json.loads((out / "vllm_qe_report.json").read_text())["input_groups"]
    short = sorted(tuple(sorted(n.rsplit(".", 1)[1] for n in g)) for g in groups if ".layers.1." in g[0]
                   and "language_model" in g[0])
    assert short == [("down_proj",), ("gate_proj", "up_proj"), ("k_proj", "q_proj", "v_proj"), ("o_proj",)]
    for g in groups:
        if "language_model" not in g[0]:  # vision tower / connector: singletons, or CLIP's separate q/k/v
            assert len(g) == 1 or sorted(n.rsplit(".", 1)[1] for n in g) == ["k_proj", "q_proj", "v_proj"], g


def test_fake_quant_model_runs_and_differs_from_full_precision(quantized_dir, tiny_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vllm_qe.testing.vqa import make_sample

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


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_killed_calibration_leaves_no_valid_folder_and_resumes_to_the_same_result(method, tmp_path, tiny_dir,
                                                                                  monkeypatch):
    from vllm_qe.calibration.algorithms.gptq import GPTQ

    cfg = CalibrationConfig(method=method, group_size=32, num_samples=3)
    full = calibrate(tiny_dir("qwen2_vl"), tmp_path / "full", cfg, progress=False)

    cls = RTN if method == "rtn" else GPTQ
    calls = {"n": 0}
    orig = cls.quantize_group

    def flaky(self, targets):
        calls["n"] += 1
        if calls["n"] == 14:  # inside the language model, after the vision tower and a few blocks
            raise KeyboardInterrupt
        return orig(self, targets)

    monkeypatch.setattr(cls, "quantize_group", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        calibrate(tiny_dir("qwen2_vl"), out, cfg, progress=False)
    assert not out.exists()
    partial = tmp_path / "out.partial"
    assert (partial / "progress.json").is_file() and not (partial / "config.json").exists()
    monkeypatch.setattr(cls, "quantize_group", orig)
    calls["resumed"] = 0

    def counting(self, targets):
        calls["resumed"] += 1
        return orig(self, targets)

    monkeypatch.setattr(cls, "quantize_group", counting)
    calibrate(tiny_dir("qwen2_vl"), out, cfg, progress=False)
    # groups done before the kill: vision blocks (2 x 4) + merger (2); the 3 finished groups of language layer 0
    # were not saved (a block is the unit of progress), so 26 - 10 groups are redone
    assert calls["resumed"] == 16
    assert not partial.exists()
    a, b = load_tensors(full), load_tensors(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_calibrate_and_inspect(tmp_path, tiny_dir):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "vllm_qe.cli", "calibrate", str(tiny_dir("llava")),
                        "--out", str(out), "--method", "rtn", "--wbits", "4", "--abits", "8", "--group-size", "32",
                        "--num-samples", "2", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "vllm_qe.cli", "inspect", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "W4A8" in r.stdout


def test_existing_output_is_not_clobbered(tmp_path, tiny_dir):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        calibrate(tiny_dir("qwen2_vl"), tmp_path / "out", CalibrationConfig(num_samples=1), progress=False)
