"""Checkpoint format v1: config parsing, validation errors that name the module/tensor, atomic writes, inspect."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_qe.format import checkpoint as ckpt
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.quantizer import compute_qparams, quantize
from vllm_qe.format.spec import AdapterScheme, FormatError, QEConfig, WeightScheme


def _qlinear(out_f=16, in_f=64, bits=4, gs=32, sym=False, adapters=None):
    w = torch.randn(out_f, in_f)
    qp = compute_qparams(w, bits, gs, sym)
    q = QuantizedLinear(quantize(w, qp), qp.scale, qp.zero, bits, gs, sym)
    if adapters:
        q.shared_a, q.shared_b = torch.randn(adapters.shared_rank, in_f), torch.randn(out_f, adapters.shared_rank)
        e, r = adapters.num_routed, adapters.routed_rank
        q.routed_a, q.routed_b, q.router = torch.randn(e, r, in_f), torch.randn(e, out_f, r), torch.rand(e, in_f)
    return q


def _write(tmp_path, name="ckpt", adapters=None, sym=False):
    adapters = adapters or AdapterScheme()
    cfg = QEConfig(weight=WeightScheme(4, 32, sym), adapters=adapters, quantized_modules=["layer.a", "layer.b"])
    tensors = {"embed.weight": torch.randn(10, 4)}
    for m in cfg.quantized_modules:
        tensors.update(_qlinear(sym=sym, adapters=adapters if adapters.shared_rank else None).to_tensors(m))
    return ckpt.write_checkpoint(tmp_path / name, model_config={"model_type": "toy"}, qconfig=cfg, tensors=tensors)


def test_config_roundtrip_and_overrides():
    cfg = QEConfig(weight=WeightScheme(3, 128, False), ignore=["lm_head", "re:visual\\..*"],
                   overrides={"x.q": {"weight": {"bits": 8}}})
    back = QEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.to_dict() == cfg.to_dict()
    assert back.module_scheme("x.q").weight.bits == 8 and back.module_scheme("x.k").weight.bits == 3
    assert back.is_ignored("lm_head") and back.is_ignored("visual.blocks.0.qkv") and not back.is_ignored("model.x")


@pytest.mark.parametrize("patch, msg", [
    ({"format_version": 7}, "unsupported format_version 7"),
    ({"quant_method": "awq"}, "quant_method"),
    ({"weight": {"bits": 5}}, "weight.bits"),
    ({"weight": {"bits": 4, "group_size": 0}}, "weight.group_size"),
    ({"activation": {"bits": 3}}, "activation.bits"),
    ({"adapters": {"num_routed": 4}}, "num_routed and routed_rank"),
    ({"colour": 1}, "unknown field"),
])
def test_config_errors_name_the_field(patch, msg):
    d = QEConfig().to_dict()
    d.update(patch)
    with pytest.raises(FormatError, match=msg):
        QEConfig.from_dict(d)


def test_write_then_inspect(tmp_path):
    out = _write(tmp_path, adapters=AdapterScheme(8, 4, 4))
    s = ckpt.inspect_checkpoint(out)
    assert set(s.modules) == {"layer.a", "layer.b"}
    assert s.adapter_params == 2 * (8 * 64 + 16 * 8 + 4 * 4 * 64 + 4 * 16 * 4 + 4 * 64)
    assert not list(tmp_path.glob("*.tmp-*"))
    text = "\n".join(s.lines())
    assert "W4A16" in text and "shared rank 8" in text


def _corrupt(out, fn):
    path = out / "model.safetensors"
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))


@pytest.mark.parametrize("mutate, msg", [
    (lambda t: t.pop("layer.b.weight_scale"), r"layer\.b\.weight_scale: missing"),
    (lambda t: t.__setitem__("layer.a.weight_packed", torch.zeros(16, 4, dtype=torch.int32)),
     r"layer\.a\.weight_packed: expected shape \[16, 8\], found \[16, 4\]"),
    (lambda t: t.__setitem__("layer.a.weight_scale", torch.full((16, 2), float("nan"), dtype=torch.float16)),
     r"layer\.a\.weight_scale: contains NaN"),
    (lambda t: t.__setitem__("layer.a.weight_zero_point", t["layer.a.weight_zero_point"].float()),
     r"layer\.a\.weight_zero_point: expected dtype torch.uint8"),
    (lambda t: t.__setitem__("layer.a.shared_a", torch.zeros(2, 64)), r"layer\.a\.shared_a: unexpected tensor"),
])
def test_bad_checkpoints_name_module_and_tensor(tmp_path, mutate, msg):
    out = _write(tmp_path)
    _corrupt(out, mutate)
    with pytest.raises(FormatError, match=msg):
        ckpt.inspect_checkpoint(out)


def test_unknown_format_version_is_rejected(tmp_path):
    out = _write(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"config.json: quantization_config.format_version: unsupported"):
        ckpt.read_qe_config(out)


def test_inspect_cli_exit_codes(tmp_path):
    out = _write(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "vllm_qe.calibration.cli", "inspect", str(out)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "2 quantized" in ok.stdout
    _corrupt(out, lambda t: t.pop("layer.a.weight_packed"))
    bad = subprocess.run([sys.executable, "-m", "vllm_qe.calibration.cli", "inspect", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "layer.a.weight_packed: missing" in bad.stderr


def test_writer_is_atomic_when_interrupted(tmp_path, monkeypatch):
    """A failure after the tensors are written leaves neither OUT nor a temp folder behind."""
    def boom(path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "_fsync_dir", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_clobber_and_replaces_with_overwrite(tmp_path):
    out = _write(tmp_path)
    with pytest.raises(FileExistsError):
        _write(tmp_path)
    shutil.copy(out / "config.json", tmp_path / "keep.json")
    cfg = QEConfig(weight=WeightScheme(4, 32, True), quantized_modules=["layer.a"])
    ckpt.write_checkpoint(out, model_config={"model_type": "toy"}, qconfig=cfg,
                          tensors=_qlinear(sym=True).to_tensors("layer.a"), overwrite=True)
    assert ckpt.read_qe_config(out).weight.symmetric
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "keep.json"]


def test_quantized_linear_tensor_roundtrip():
    q = _qlinear(adapters=AdapterScheme(4, 2, 3))
    cfg = QEConfig(weight=WeightScheme(4, 32, False), adapters=AdapterScheme(4, 2, 3))
    t = {k.split(".", 1)[1]: v for k, v in q.to_tensors("m").items()}
    ckpt.validate_module("m", t, cfg.module_scheme("m"))
    back = QuantizedLinear.from_tensors(t, cfg.module_scheme("m"))
    assert torch.equal(back.qweight, q.qweight) and torch.equal(back.scale, q.scale)
    torch.testing.assert_close(back.router, q.router)
