"""Checkpoint format v1: config parsing, whole-checkpoint validation with errors that name the file/field/tensor,
atomic writes, stored bits per weight, inspect. A tiny Llama (built in milliseconds) stands in for a model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_qe.format import checkpoint as ckpt
from vllm_qe.format.files import INCOMPLETE_MARKER
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.quantizer import compute_qparams, quantize
from vllm_qe.format.spec import AdapterScheme, FormatError, QEConfig, WeightScheme

HIDDEN, INTER = 64, 96
MODULES = ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]  # [64, 64] (with bias), [64, 96]


def _toy_model() -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json contents and state dict of a 1-layer Llama with attention biases (o_proj has one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return d, sd


def _qlinear(w: torch.Tensor, bits=4, gs=32, sym=False, adapters: AdapterScheme | None = None):
    out_f, in_f = w.shape
    qp = compute_qparams(w, bits, gs, sym)
    q = QuantizedLinear(quantize(w, qp), qp.scale, qp.zero, bits, gs, sym)
    if adapters and adapters.shared_rank:
        q.shared_a, q.shared_b = torch.randn(adapters.shared_rank, in_f), torch.randn(out_f, adapters.shared_rank)
    if adapters and adapters.num_routed:
        e, r = adapters.num_routed, adapters.routed_rank
        q.routed_a, q.routed_b, q.router = torch.randn(e, r, in_f), torch.randn(e, out_f, r), torch.rand(e, in_f)
    return q


def _tensors(adapters=None, sym=False, modules=MODULES, half=False):
    model_cfg, sd = _toy_model()
    tensors = {k: v.half() if half else v for k, v in sd.items()}
    for m in modules:
        w = tensors.pop(f"{m}.weight")
        tensors.update(_qlinear(w, sym=sym, adapters=adapters).to_tensors(m))
    return model_cfg, tensors


def _write(tmp_path, name="ckpt", adapters=None, sym=False, half=False, **kw):
    adapters = adapters or AdapterScheme()
    cfg = QEConfig(weight=WeightScheme(4, 32, sym), adapters=adapters, quantized_modules=list(MODULES))
    model_cfg, tensors = _tensors(adapters, sym, half=half)
    return ckpt.write_checkpoint(tmp_path / name, model_config=model_cfg, qconfig=cfg, tensors=tensors, **kw)


def test_config_roundtrip_and_overrides():
    cfg = QEConfig(weight=WeightScheme(3, 128, False), ignore=["lm_head", "re:visual\\..*"],
                   overrides={"x.q": {"weight": {"bits": 8}}})
    back = QEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.to_dict() == cfg.to_dict()
    assert back.module_scheme("x.q").weight.bits == 8 and back.module_scheme("x.k").weight.bits == 3
    assert back.is_ignored("lm_head") and back.is_ignored("visual.blocks.0.qkv") and not back.is_ignored("model.x")


@pytest.mark.parametrize("path, value, msg", [
    (("format_version",), 7, "unsupported format_version 7"),
    (("format_version",), True, "unsupported format_version True"),
    (("quant_method",), "awq", "quant_method"),
    (("weight", "bits"), 5, r"weight\.bits"),
    (("weight", "bits"), 4.0, r"weight\.bits"),
    (("weight", "group_size"), 0, r"weight\.group_size"),
    (("weight", "symmetric"), "no", r"weight\.symmetric: must be true or false"),
    (("activation",), {"bits": 3, "scheme": "per_token_dynamic", "symmetric": True}, r"activation\.bits"),
    (("adapters", "num_routed"), 4, "num_routed and routed_rank"),
    (("adapters", "top_k"), True, r"adapters\.top_k"),
    (("smooth",), "false", r"smooth: must be true or false"),
    (("ignore",), "lm_head", r"ignore: expected a list"),
    (("algorithm",), [1], r"algorithm: expected an object"),
    (("overrides",), {"m": {"weight": {"bitz": 8}}}, r"overrides\['m'\]\.weight: unknown field"),
    (("colour",), 1, "unknown field"),
])
def test_config_errors_name_the_field(path, value, msg):
    d = QEConfig().to_dict()
    node = d
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(FormatError, match=msg):
        QEConfig.from_dict(d)


@pytest.mark.parametrize("field", ["weight", "activation", "adapters", "smooth", "quantized_modules", "weight.bits"])
def test_config_fields_are_required(field):
    d = QEConfig().to_dict()
    if "." in field:
        del d["weight"]["bits"]
    else:
        del d[field]
    with pytest.raises(FormatError, match=rf"quantization_config\.{field}: missing"):
        QEConfig.from_dict(d)


def test_write_then_inspect(tmp_path):
    out = _write(tmp_path, adapters=AdapterScheme(8, 4, 4))
    s = ckpt.inspect_checkpoint(out)
    assert set(s.modules) == set(MODULES)
    per = lambda o, i: 8 * i + o * 8 + 4 * 4 * i + 4 * o * 4 + 4 * i  # noqa: E731
    assert s.adapter_params == per(64, 64) + per(64, 96)
    assert not list(tmp_path.glob("*.tmp-*"))
    text = "\n".join(s.lines())
    assert "W4A16" in text and "shared rank 8" in text and "LlamaForCausalLM" in text


def test_stored_bits_per_weight_are_counted_from_the_stored_dtypes(tmp_path):
    """W4 g32 asymmetric: 4 bits + a float16 scale and a uint8 zero point per 32 weights = 4.75 bpw; float16
    adapters add 16 * r * (in + out) / (in * out) bits per weight."""
    plain = _write(tmp_path, "plain")
    st = json.loads((plain / "config.json").read_text())["quantization_config"]["storage"]
    assert st["bits_per_weight"] == 4.75 and set(st["per_module"].values()) == {4.75}
    assert st["quantized_weights"] == 64 * 64 + 64 * 96
    r = 8
    qe = _write(tmp_path, "qe", adapters=AdapterScheme(r, 0, 0))
    st = json.loads((qe / "config.json").read_text())["quantization_config"]["storage"]
    o, i = 64, 96
    assert st["per_module"][MODULES[1]] == round(4.75 + 16 * r * (i + o) / (i * o), 4)
    files = sum(f.stat().st_size for f in qe.glob("*.safetensors"))
    assert 0 < files - ckpt.inspect_checkpoint(qe).storage.total_bytes < 16384  # headers only
    lines = ckpt.inspect_lines(qe)
    assert any(ln.startswith("bits per weight") for ln in lines) and any("at FP16" in ln for ln in lines)


def test_inspect_warns_when_larger_than_fp16(tmp_path):
    """FP16 size: every quantized weight and floating tensor at 16 bits (the toy's other tensors stored in fp16)."""
    out = _write(tmp_path, adapters=AdapterScheme(48, 0, 0), half=True)
    assert any("larger than its FP16 source" in ln for ln in ckpt.inspect_lines(out))
    assert not any(ln.startswith("WARNING") for ln in ckpt.inspect_lines(_write(tmp_path, "small", half=True)))


def _corrupt(out, fn):
    path = out / "model.safetensors"
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))


OPROJ, DOWN = MODULES


@pytest.mark.parametrize("mutate, msg", [
    (lambda t: t.pop(f"{DOWN}.weight_scale"), rf"{DOWN}\.weight_scale: missing"),
    (lambda t: t.__setitem__(f"{OPROJ}.weight_packed", torch.zeros(64, 4, dtype=torch.int32)),
     rf"{OPROJ}\.weight_packed: expected shape \[64, 8\], found \[64, 4\]"),
    (lambda t: t.__setitem__(f"{OPROJ}.weight_scale", torch.full((64, 2), float("nan"), dtype=torch.float16)),
     rf"{OPROJ}\.weight_scale: contains NaN"),
    (lambda t: t.__setitem__(f"{OPROJ}.weight_zero_point", t[f"{OPROJ}.weight_zero_point"].float()),
     rf"{OPROJ}\.weight_zero_point: expected dtype torch.uint8"),
    (lambda t: t.__setitem__(f"{OPROJ}.shared_a", torch.zeros(2, 64)), rf"{OPROJ}\.shared_a: unexpected tensor"),
    # the model's own tensors
    (lambda t: t.pop(f"{OPROJ}.bias"), rf"{OPROJ}\.bias: missing \(the model expects float32 \[64\]\)"),
    (lambda t: t["model.norm.weight"].__setitem__(3, float("nan")), r"model\.norm\.weight: contains NaN or Inf"),
    (lambda t: t.__setitem__("model.norm.weigth", t.pop("model.norm.weight")),
     r"model\.norm\.weigth: unexpected tensor \(LlamaForCausalLM has no such parameter\)"),
    (lambda t: t.__setitem__("model.embed_tokens.weight", torch.zeros(32, 63)),
     r"model\.embed_tokens\.weight: expected shape \[32, 64\], found \[32, 63\]"),
    (lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)),
     r"model\.norm\.weight: expected a floating dtype"),
    (lambda t: t.__setitem__(f"{DOWN}.weight_shape", torch.tensor([64, 95])),
     rf"{DOWN}\.weight_shape: \[64, 95\] but the model's {DOWN}\.weight is \[64, 96\]"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight_packed", torch.zeros(64, 8, dtype=torch.int32)),
     r"q_proj\.weight_packed: tensor of a quantized module, but .* is not listed"),
])
def test_bad_checkpoints_name_the_tensor(tmp_path, mutate, msg):
    out = _write(tmp_path)
    _corrupt(out, mutate)
    with pytest.raises(FormatError, match=msg):
        ckpt.inspect_checkpoint(out)


@pytest.mark.parametrize("content, msg", [
    (b"", r"model\.safetensors: empty file"),
    (b"\x10\x00", r"model\.safetensors: truncated"),
    (None, r"model\.safetensors: truncated \(tensor "),
])
def test_empty_or_truncated_files_are_named(tmp_path, content, msg):
    out = _write(tmp_path)
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100] if content is None else content)
    with pytest.raises(FormatError, match=msg):
        ckpt.inspect_checkpoint(out)


def test_index_shards_must_exist_and_agree(tmp_path):
    model_cfg, tensors = _tensors()
    cfg = QEConfig(weight=WeightScheme(4, 32, False), quantized_modules=list(MODULES))
    names = sorted(tensors)
    half = len(names) // 2
    shards = [("model-00001-of-00002.safetensors", lambda: {k: tensors[k] for k in names[:half]}),
              ("model-00002-of-00002.safetensors", lambda: {k: tensors[k] for k in names[half:]})]
    out = ckpt.write_checkpoint(tmp_path / "sh", model_config=model_cfg, qconfig=cfg, shards=shards)
    ckpt.inspect_checkpoint(out)
    (out / "model-00002-of-00002.safetensors").rename(tmp_path / "away.safetensors")
    with pytest.raises(FormatError, match=r"index.json: shard model-00002-of-00002.safetensors \(holding .*\) does "
                                          r"not exist"):
        ckpt.inspect_checkpoint(out)
    (tmp_path / "away.safetensors").rename(out / "model-00003-of-00002.safetensors")
    with pytest.raises(FormatError, match="does not exist"):
        ckpt.inspect_checkpoint(out)


def test_unknown_format_version_is_rejected(tmp_path):
    out = _write(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"config.json: quantization_config.format_version: unsupported"):
        ckpt.read_qe_config(out)


def test_recorded_storage_must_match_the_files(tmp_path):
    out = _write(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["storage"]["bits_per_weight"] = 4.0
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"storage\.bits_per_weight: recorded 4\.0, the stored tensors give 4\.75"):
        ckpt.inspect_checkpoint(out)


def test_inspect_cli_exit_codes(tmp_path, capsys):
    from vllm_qe.cli import main

    out = _write(tmp_path)
    assert main(["inspect", str(out), "--modules"]) == 0
    text = capsys.readouterr().out
    assert "2 quantized" in text and "4.750 bpw" in text
    _corrupt(out, lambda t: t.pop(f"{OPROJ}.bias"))
    assert main(["inspect", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"invalid checkpoint: {OPROJ}.bias: missing (the model expects float32 [64])"]


STEPS = ["tensors", "validated", "config", "unmarked", "moved_aside", "renamed"]


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_leaves_nothing_that_passes_for_a_checkpoint(tmp_path, monkeypatch, step):
    """Simulated kill -9 (no cleanup runs) at each step of a write that replaces an existing checkpoint: every
    folder left is either refused by the validator or a complete checkpoint (the old or the new one); the next
    write removes the leftovers."""
    _write(tmp_path, adapters=AdapterScheme(4, 0, 0))  # the old checkpoint
    old_cfg = (tmp_path / "ckpt" / "config.json").read_text()

    class Killed(BaseException):
        pass

    def kill(s):
        if s == step:
            raise Killed

    monkeypatch.setattr(ckpt, "_kill_point", kill)
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
    with pytest.raises(Killed):
        _write(tmp_path, overwrite=True)
    monkeypatch.undo()
    left = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert left, step
    for p in left:
        try:
            ckpt.validate_checkpoint(p)
        except FormatError as e:
            assert "unfinished write" in str(e) or "config.json: not found" in str(e), (step, p.name, e)
            continue
        shared = ckpt.read_qe_config(p).adapters.shared_rank
        # a complete folder is the old checkpoint or the new one (validated, only its rename was missing)
        assert shared in (0, 4) and (p.name == "ckpt" or ".old-" in p.name or ".tmp-" in p.name), (step, p.name)
        if shared == 4:
            assert (p / "config.json").read_text() == old_cfg
    _write(tmp_path, "ckpt", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert ckpt.read_qe_config(tmp_path / "ckpt").adapters.shared_rank == 0


def test_unfinished_folder_is_refused_by_the_cli(tmp_path, capsys):
    from vllm_qe.cli import main

    out = _write(tmp_path)
    (out / INCOMPLETE_MARKER).write_text("")
    assert main(["inspect", str(out)]) == 1
    assert "an unfinished write" in capsys.readouterr().err


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
    _write(tmp_path, sym=True, overwrite=True)
    assert ckpt.read_qe_config(out).weight.symmetric
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "keep.json"]


def test_writer_refuses_a_checkpoint_that_does_not_validate(tmp_path):
    model_cfg, tensors = _tensors()
    del tensors["model.norm.weight"]
    cfg = QEConfig(weight=WeightScheme(4, 32, False), quantized_modules=list(MODULES))
    with pytest.raises(FormatError, match=r"model\.norm\.weight: missing"):
        ckpt.write_checkpoint(tmp_path / "x", model_config=model_cfg, qconfig=cfg, tensors=tensors)
    assert list(tmp_path.iterdir()) == []


def test_quantized_linear_tensor_roundtrip():
    q = _qlinear(torch.randn(16, 64), adapters=AdapterScheme(4, 2, 3))
    cfg = QEConfig(weight=WeightScheme(4, 32, False), adapters=AdapterScheme(4, 2, 3))
    t = {k.split(".", 1)[1]: v for k, v in q.to_tensors("m").items()}
    ckpt.validate_module("m", t, cfg.module_scheme("m"))
    back = QuantizedLinear.from_tensors(t, cfg.module_scheme("m"))
    assert torch.equal(back.qweight, q.qweight) and torch.equal(back.scale, q.scale)
    assert torch.equal(back.router, q.router.half().float())  # adapters and router are stored as float16


QKV = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]


def test_fused_modules_need_equal_smoothing(tmp_path):
    """q/k/v read one input and vLLM fuses them: their smoothing vectors must be identical."""
    model_cfg, tensors = _toy_model()
    smooth = torch.rand(HIDDEN) + 0.5
    for m in QKV:
        q = _qlinear(tensors.pop(f"{m}.weight") * smooth)
        q.smooth = smooth
        tensors.update(q.to_tensors(m))
    cfg = QEConfig(weight=WeightScheme(4, 32, False), smooth=True, quantized_modules=list(QKV))
    out = ckpt.write_checkpoint(tmp_path / "ok", model_config=model_cfg, qconfig=cfg, tensors=dict(tensors))
    assert set(ckpt.inspect_checkpoint(out).modules) == set(QKV)
    tensors[f"{QKV[1]}.smooth_scale"] = smooth * 1.01
    with pytest.raises(FormatError, match=rf"^{QKV[1]}\.smooth_scale: differs from {QKV[0]}\.smooth_scale"):
        ckpt.write_checkpoint(tmp_path / "bad", model_config=model_cfg, qconfig=cfg, tensors=tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]
