"""Calibration driver + RTN on tiny real-architecture VLMs (transformers only, no vLLM)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from vllm_qe.calibration.algorithms import REGISTRY, Algorithm, StatsRequest
from vllm_qe.calibration.algorithms.compose import SEARCH_TOKENS, Recipe, smooth_then_quantize
from vllm_qe.calibration.algorithms.lowrank import pad_rank, whitened_svd
from vllm_qe.calibration.algorithms.rtn import RTN
from vllm_qe.calibration.api import CalibrationConfig, calibrate
from vllm_qe.calibration.data import build_inputs
from vllm_qe.calibration.fakequant import FakeQuantLinear, load_fake_quant_model
from vllm_qe.format.checkpoint import inspect_checkpoint, load_tensors, read_qe_config
from vllm_qe.format.quantizer import compute_qparams, fake_quantize_weight
from vllm_qe.format.spec import AdapterScheme


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


# -- the algorithm contract from the outside: a new algorithm is one class + one registry line ----------------------
@dataclass
class _AWQLowRankConfig:
    rank: int = 8
    grid: int = 10


class _AWQLowRank(Algorithm):
    """The worked example of docs/architecture.md: AWQ scales + RTN (composed), then a shared low-rank expert
    fitted to the remaining error in the activation norm."""

    name = "awq_lr"
    Config = _AWQLowRankConfig

    @property
    def adapters(self) -> AdapterScheme:
        return AdapterScheme(shared_rank=self.config.rank)

    def uses_smoothing(self, act_quantized: bool) -> bool:
        return True

    def stats_request(self, scheme) -> StatsRequest:
        return StatsRequest(gram=True, max_tokens=SEARCH_TOKENS)

    def quantize_group(self, targets):
        out = smooth_then_quantize(Recipe("awq", "rtn", grid=self.config.grid), targets,
                                   targets[0].stats.sample_weight)
        for t in targets:
            q = out[t.name]
            a, b = whitened_svd(t.weight - q.dequantized_weight(), t.stats.hessian(), self.config.rank)
            q.shared_a, q.shared_b = pad_rank(a, b, self.config.rank)
        return out


def test_a_toy_algorithm_registered_in_one_line_calibrates_end_to_end(monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setitem(REGISTRY, _AWQLowRank.name, _AWQLowRank)  # the one registry line
    with pytest.raises(ValueError, match=r"method 'awq_lr': unknown parameter 'rnak'; allowed: rank: int = 8"):
        calibrate(tiny_dir("qwen2_vl"), tmp_path / "bad", CalibrationConfig(method="awq_lr", method_params={"rnak": 4}))
    assert not (tmp_path / "bad").exists()
    cfg = CalibrationConfig(method="awq_lr", method_params={"rank": 4}, wbits=3, abits=8, group_size=32,
                            num_samples=2)
    out = calibrate(tiny_dir("qwen2_vl"), tmp_path / "toy", cfg, progress=False)
    qcfg = read_qe_config(out)
    assert qcfg.algorithm == {"name": "awq_lr", "params": {"rank": 4}} and qcfg.adapters.shared_rank == 4
    assert qcfg.smooth and len(qcfg.quantized_modules) == 38
    tensors = load_tensors(out)
    for m in qcfg.quantized_modules:
        assert tensors[f"{m}.shared_a"].shape[0] == 4 and f"{m}.smooth_scale" in tensors
    # on one synthetic layer, the low-rank expert lowers AWQ's output error (same scales, same integers)
    from vllm_qe.calibration.algorithms import LinearTarget, get_algorithm
    from vllm_qe.calibration.stats import InputStats
    from vllm_qe.format.spec import ActivationScheme, ModuleScheme, WeightScheme

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    w = torch.randn(48, 64, generator=g) * 0.05
    st = InputStats(64, gram=True, max_tokens=SEARCH_TOKENS)
    st.update(x, torch.zeros(512, dtype=torch.bool))
    scheme = ModuleScheme(WeightScheme(3, 32, False), ActivationScheme(bits=8), AdapterScheme(shared_rank=8))
    errs = {}
    for name in ("awq", "awq_lr"):
        q = get_algorithm(name, grid=10).quantize_group([LinearTarget("l", w, None, st, scheme)])["l"]
        y = FakeQuantLinear(q, None, 8)(x)
        errs[name] = float((y - x @ w.t()).norm())
    assert errs["awq_lr"] < 0.8 * errs["awq"], errs


def test_cli_rejects_a_mistyped_method_param_naming_the_algorithm_and_its_keys(tmp_path, capsys):
    from vllm_qe.cli import main

    rc = main(["calibrate", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), "--method", "qe",
               "--method-params", '{"alpah": 1}'])
    err = capsys.readouterr().err
    assert rc == 2 and "method 'qe': unknown parameter 'alpah'" in err and "alpha: float = 0.5" in err
    assert "num_routed: int = 8" in err and not (tmp_path / "out").exists()
    rc = main(["calibrate", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), "--method", "veq",
               "--method-params", '{"mode": "mx"}'])
    assert rc == 2 and "parameter 'mode' must be 'ma' | 'me' | 'me+ma', got 'mx'" in capsys.readouterr().err


def test_dry_run_prints_the_plan_the_calibration_follows(quantized_dir, tiny_dir, tmp_path, capsys):
    from vllm_qe.calibration.api import plan_calibration
    from vllm_qe.cli import main

    model = tiny_dir("qwen3_vl_moe")
    rc = main(["calibrate", str(model), "--out", str(tmp_path / "out"), "--method", "veq", "--method-params",
               '{"mode": "me+ma"}', "--group-size", "32", "--no-vision", "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "out").exists()
    assert "method veq: VEQConfig(mode='me+ma')" in text and "gradient pass yes" in text
    assert "model.visual" not in text  # --no-vision: only the language blocks
    assert "1 language  model.language_model.layers.0: self_attn.q_proj" in text
    assert "mlp.experts.{0..7}.{gate,up,down}_proj [W4 g32]" in text
    # the plan's modules are exactly those a calibration with the same settings quantizes
    plan = plan_calibration(model, CalibrationConfig(method="rtn", group_size=32))
    planned = sorted(plan.disk[n] for n in plan.in_chains if plan.scheme_of(n) is not None)
    assert planned == read_qe_config(quantized_dir("qwen3_vl_moe", "rtn", wbits=4, abits=None)).quantized_modules


def test_vllm_qe_calibration_imports_from_a_plain_checkout(tmp_path):
    """Nothing installed (`-S`: no .pth, so no editable finder), only the repository root on the path: the
    `calibration/` and `kernels/` folders are still `vllm_qe.calibration` / `vllm_qe.kernels`."""
    import site
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (f"import sys; sys.path[:0] = [{str(root)!r}]; sys.path.append({site.getsitepackages()[0]!r}); "
            "import vllm_qe.calibration.api as a, vllm_qe.kernels.reference as r; print(a.__file__, r.__file__)")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [str(root / "calibration" / "api.py"), str(root / "kernels" / "reference.py")]
