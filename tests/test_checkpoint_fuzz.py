"""Checkpoint fuzz: generated corruptions of real checkpoints (RTN and QE dense, RTN MoE; calibrated by the API)
must each end in a one-line `FormatError` that names the tensor, field or file — or, where the format tolerates
the change, in an identical answer. Never a silent load.

Corruptions: every tensor (delete, misspell, wrong shape, wrong dtype, NaN/Inf/non-positive values), every field
of `quantization_config` (delete, wrong type, out of range), shape-bearing model-config fields, and the files
(empty, truncated, trailing bytes, missing; for a sharded copy: a missing shard, an index that disagrees with the
files, a stray shard, a corrupt index).

Tolerated, by design: a floating tensor of the model (norm, embedding, bias, unquantized layer) stored in another
floating dtype (loaders cast it to the model dtype: the answer is a deterministic function of the stored values),
and config changes that leave every module's effective scheme and the module list unchanged (informational fields:
`algorithm`, `ignore`, deleting `storage`) — checked here by comparing the effective schemes.

Tiers (tests/conftest.py): the checkpoints are calibrated by the API, so these are `integration` tests —
validator only: a seeded sample of tensors per checkpoint (every corruption kind, every tensor class) plus every
config field and every file/index corruption; `-m "slow and integration"`: every tensor x every corruption kind;
`vllm`: representative corruptions through vLLM's load path — the same one line, before the engine starts, and a
tolerated one answered identically twice. The format-level cases on a toy model are in test_format.py (fast
tier). Set VLLM_QE_FUZZ_SEED to draw another sample.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_qe.format import checkpoint as ckpt
from vllm_qe.format.files import INDEX_NAME
from vllm_qe.format.spec import ALL_SUFFIXES, FormatError, QEConfig
from vllm_qe.format.validate import validate_checkpoint

SEED = int(os.environ.get("VLLM_QE_FUZZ_SEED", "0"))
QE_SMALL = {"k": 8, "num_routed": 4, "shared_rank": 8, "routed_rank": 8}  # as in test_vllm_serving (shared build)
CHECKPOINTS = {
    "rtn": ("qwen2_vl", "rtn", dict(wbits=4, abits=8)),
    "qe": ("qwen2_vl", "qe", dict(wbits=4, abits=None, method_params=QE_SMALL)),
    "moe": ("qwen3_vl_moe", "rtn", dict(wbits=4, abits=None)),
}
TENSOR_KINDS = ("delete", "rename", "shape", "dtype", "value")
FAST_TENSORS = 6  # tensors drawn per checkpoint in the fast tier, plus one of every tensor class
FAST_KINDS_PER_TENSOR = 2  # rotating through TENSOR_KINDS, so every kind is drawn


@dataclass
class Corruption:
    what: str
    apply: Callable[[Path], None]  # mutates a private copy of the checkpoint folder
    tolerated_if: str = ""  # "float_cast" or "same_schemes": the tolerated outcome this corruption may have
    mentions: tuple[str, ...] = ()  # the error must name one of these (tensor, its module, the misspelt name)


# -- building blocks ---------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    """A private copy: config, index and safetensors (hard links; mutated files are rewritten, never edited)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors" or f.name == INDEX_NAME:
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    return dst


def _rewrite(folder: Path, fn: Callable[[dict[str, torch.Tensor]], None], fname: str = "model.safetensors"):
    path = folder / fname
    t = load_file(str(path))
    fn(t)
    path.unlink()
    save_file(t, str(path))


def _edit_config(folder: Path, fn: Callable[[dict], None]) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.unlink()
    path.write_text(json.dumps(cfg))


def _file_of(folder: Path, name: str) -> str:
    idx = folder / INDEX_NAME
    return json.loads(idx.read_text())["weight_map"][name] if idx.exists() else "model.safetensors"


def _module_tensor(name: str, modules: set[str]) -> bool:
    mod, _, suffix = name.rpartition(".")
    return mod in modules and suffix in ALL_SUFFIXES


def _misspell(name: str) -> str:
    head, _, last = name.rpartition(".")
    swapped = last[:-2] + last[-1] + last[-2] if len(last) > 1 and last[-1] != last[-2] else last + "_"
    return f"{head}.{swapped}"


# -- generators --------------------------------------------------------------------------------------------------
def tensor_corruptions(src: Path, names: list[str], kinds: tuple[str, ...], rng: random.Random,
                       per_tensor: int | None = None) -> list[Corruption]:
    """`kinds` of corruption for each tensor in `names` (kinds that do not apply to a tensor are skipped); with
    `per_tensor`, only that many kinds per tensor, rotating through `kinds`."""
    meta = ckpt.lazy_tensors(src)
    modules = set(ckpt.read_qe_config(src).quantized_modules)
    out = []
    for name in names:
        t = meta[name]
        fname = _file_of(src, name)
        in_module = _module_tensor(name, modules)
        mod = name.rpartition(".")[0]
        mentions = (name, _misspell(name)) + ((f"{mod}.", f"{mod}:") if in_module else ())
        chosen = kinds if per_tensor is None else [kinds[(names.index(name) + j) % len(kinds)]
                                                   for j in range(per_tensor)]
        for kind in chosen:
            if kind == "delete":
                fn = lambda d, n=name: d.pop(n)  # noqa: E731
            elif kind == "rename":
                fn = lambda d, n=name: d.__setitem__(_misspell(n), d.pop(n))  # noqa: E731
            elif kind == "shape":
                dim = rng.randrange(max(t.shape.__len__(), 1))
                shape = list(t.shape) or [1]
                shape[dim] += rng.choice((-1, 1)) if shape[dim] > 1 else 1
                fn = lambda d, n=name, s=tuple(shape): d.__setitem__(n, torch.zeros(s, dtype=d[n].dtype))  # noqa: E731
            elif kind == "dtype":
                if t.dtype.is_floating_point:
                    new = rng.choice([torch.int32, torch.float16, torch.bfloat16, torch.float64])
                    new = torch.int32 if new == t.dtype else new
                else:
                    new = rng.choice([torch.float32, torch.int64 if t.dtype != torch.int64 else torch.int32])
                fn = lambda d, n=name, dt=new: d.__setitem__(n, d[n].to(dt))  # noqa: E731
                tol = "float_cast" if t.dtype.is_floating_point and new.is_floating_point and not in_module else ""
                out.append(Corruption(f"{kind} {name} -> {new}", _on(fname, fn), tol, mentions))
                continue
            elif kind == "value":
                if t.dtype.is_floating_point:
                    suffix = name.rpartition(".")[2]
                    bad = [float("nan"), float("inf"), float("-inf")]
                    if suffix in ("weight_scale", "smooth_scale"):
                        bad += [0.0, -1.0]
                    val = rng.choice(bad)
                elif name.endswith((".weight_zero_point", ".weight_shape")):
                    val = 255  # zero point >= 2^bits for the 4-bit fixtures (weight_shape: set below)
                else:
                    continue  # packed integers: every bit pattern is a valid code (tolerated, not a corruption)
                pos = rng.randrange(max(t.numel(), 1))
                if name.endswith(".weight_shape"):
                    val = int(t.load()[pos]) + rng.choice((-1, 1, 32))
                fn = lambda d, n=name, v=val, p=pos: d[n].view(-1).__setitem__(p, v)  # noqa: E731
            out.append(Corruption(f"{kind} {name}", _on(fname, fn), "", mentions))
    return out


def _on(fname: str, fn) -> Callable[[Path], None]:
    return lambda folder: _rewrite(folder, fn, fname)


def _leaves(node, path=()):
    """(path, value) of every field of a JSON tree, inner nodes included (lists, and the module-keyed
    `storage.per_module`: first and last item)."""
    yield path, node
    if path == ("algorithm", "params"):
        return  # the algorithm's own parameters: informational, opaque to the format
    if isinstance(node, dict):
        keys = list(node)
        if path[-1:] == ("per_module",) and keys:
            keys = sorted({keys[0], keys[-1]}, key=keys.index)
        for k in keys:
            yield from _leaves(node[k], (*path, k))
    elif isinstance(node, list) and node:
        for i in sorted({0, len(node) - 1}):
            yield from _leaves(node[i], (*path, i))


def _bad_values(value, nullable: bool = False) -> list:
    """Wrong types and out-of-range values for a field holding `value` (`nullable`: null is a legal value)."""
    return [v for v in _bad_values_any(value) if not (nullable and v is None)]


def _bad_values_any(value) -> list:
    if isinstance(value, bool):
        return ["true", 1, None]
    if isinstance(value, int):
        return [str(value), value + 0.5, True, None, [value], -1, 0, 5, 2**40]
    if isinstance(value, float):
        return [str(value), None, float("nan"), -1.0]
    if isinstance(value, str):
        return [7, None, [], value + "_x"]
    if isinstance(value, list):
        return ["x", {}, None, [], value + value[:1]]
    if isinstance(value, dict):
        return [[], "x", None, {}]
    return ["x", 1, [], {"a": 1}]  # null (e.g. activation of a weight-only checkpoint)


def config_corruptions(src: Path) -> list[Corruption]:
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    out = []
    for path, value in _leaves(qc):
        if not path:
            continue
        where = "quantization_config." + ".".join(map(str, path))
        nullable = path in (("activation",), ("storage",))  # null: weight-only / no record (legal values)
        variants = [("delete", None)] + [(f"= {json.dumps(v)[:40]}", v) for v in _bad_values(value, nullable)
                                         if json.dumps(v) != json.dumps(value)]
        for label, v in variants:
            def fn(cfg, path=path, v=v, delete=label == "delete"):
                node = cfg["quantization_config"]
                for p in path[:-1]:
                    node = node[p]
                if delete:
                    del node[path[-1]]
                else:
                    node[path[-1]] = copy.deepcopy(v)
            out.append(Corruption(f"{where} {label}", lambda f, fn=fn: _edit_config(f, fn), "same_schemes"))
    return out


def model_config_corruptions(src: Path) -> list[Corruption]:
    """Fields of config.json that fix the model's tensors."""
    cfg = json.loads((src / "config.json").read_text())
    out = [Corruption("config.json architectures delete", lambda f: _edit_config(f, lambda c: c.pop("architectures"))),
           Corruption("config.json architectures = [Nope]",
                      lambda f: _edit_config(f, lambda c: c.__setitem__("architectures", ["NopeForCausalLM"]))),
           Corruption("config.json model_type = nope",
                      lambda f: _edit_config(f, lambda c: c.__setitem__("model_type", "nope")))]
    moe = "moe_intermediate_size" in cfg.get("text_config", {})  # (all MoE layers: intermediate_size is unused)
    for sub, key, delta in [("text_config", "num_hidden_layers", -1), ("text_config", "num_hidden_layers", 1),
                            ("text_config", "vocab_size", 1), ("vision_config", "depth", 1),
                            ("vision_config", "depth", -1),
                            ("text_config", "moe_intermediate_size" if moe else "intermediate_size", 8)]:
        if key in cfg.get(sub, {}):
            def fn(c, sub=sub, key=key, delta=delta):
                c[sub][key] += delta
            out.append(Corruption(f"config.json {sub}.{key} {delta:+d}", lambda f, fn=fn: _edit_config(f, fn)))
    return out


def file_corruptions(src: Path) -> list[Corruption]:
    size = (src / "model.safetensors").stat().st_size
    header = int.from_bytes((src / "model.safetensors").read_bytes()[:8], "little")

    def cut(n):
        def fn(folder):
            data = (folder / "model.safetensors").read_bytes()
            (folder / "model.safetensors").unlink()
            (folder / "model.safetensors").write_bytes(data[:n])
        return fn

    def append(folder):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").write_bytes(data + b"\0" * 16)

    def config_text(text):
        def fn(folder):
            (folder / "config.json").unlink()
            (folder / "config.json").write_text(text)
        return fn

    out = [Corruption(f"model.safetensors truncated to {n} bytes", cut(n))
           for n in (0, 5, 8 + header // 2, 8 + header, 8 + header + (size - 8 - header) // 2, size - 1)]
    out += [Corruption("model.safetensors + 16 bytes", append),
            Corruption("model.safetensors deleted", lambda f: (f / "model.safetensors").unlink()),
            Corruption("config.json deleted", lambda f: (f / "config.json").unlink()),
            Corruption("config.json truncated", config_text((src / "config.json").read_text()[:100])),
            Corruption("config.json a list", config_text("[]"))]
    return out


def sharded_copy(src: Path, dst: Path) -> Path:
    """The same checkpoint written by the writer as 3 shards + index."""
    tensors = ckpt.load_tensors(src)
    names = sorted(tensors)
    parts = [names[i::3] for i in range(3)]
    cfg = json.loads((src / "config.json").read_text())
    qcfg = QEConfig.from_dict(cfg.pop("quantization_config"))
    shards = [(f"model-0000{i + 1}-of-00003.safetensors", lambda p=p: {k: tensors[k] for k in p})
              for i, p in enumerate(parts)]
    return ckpt.write_checkpoint(dst, model_config=cfg, qconfig=qcfg, shards=shards)


def index_corruptions(src: Path) -> list[Corruption]:
    wm = json.loads((src / INDEX_NAME).read_text())["weight_map"]
    first = sorted(wm)[0]

    def edit_index(fn):
        def apply(folder):
            idx = json.loads((folder / INDEX_NAME).read_text())
            fn(idx)
            (folder / INDEX_NAME).unlink()
            (folder / INDEX_NAME).write_text(json.dumps(idx))
        return apply

    def stray(folder):
        save_file({"x": torch.zeros(1)}, str(folder / "extra.safetensors"))

    def corrupt(folder):
        (folder / INDEX_NAME).unlink()
        (folder / INDEX_NAME).write_text("{")

    return [
        Corruption("shard 2 deleted", lambda f: (f / "model-00002-of-00003.safetensors").unlink()),
        Corruption("index names a missing shard",
                   edit_index(lambda i: i["weight_map"].__setitem__(first, "model-00009-of-00003.safetensors"))),
        Corruption("index entry deleted", edit_index(lambda i: i["weight_map"].pop(first))),
        Corruption("index entry points at another shard", edit_index(lambda i: i["weight_map"].__setitem__(
            first, next(v for v in sorted(set(wm.values())) if v != wm[first])))),
        Corruption("index entry for a tensor no shard has",
                   edit_index(lambda i: i["weight_map"].__setitem__("model.ghost.weight", wm[first]))),
        Corruption("stray shard outside the index", stray),
        Corruption("index is not JSON", corrupt),
        Corruption("index weight_map is a list", edit_index(lambda i: i.__setitem__("weight_map", []))),
    ]


# -- the oracle --------------------------------------------------------------------------------------------------
def _effective(folder: Path) -> tuple:
    q = ckpt.read_qe_config(folder)
    return tuple(q.quantized_modules), tuple(q.module_scheme(m) for m in q.quantized_modules)


def check(src: Path, corruption: Corruption, work: Path) -> str:
    """Apply `corruption` to a copy of `src` and validate it: a one-line FormatError naming a tensor, field or
    file, or a tolerated change with the answer it allows. Returns "error: ..." or "tolerated"."""
    folder = _copy(src, work)
    corruption.apply(folder)
    try:
        validate_checkpoint(folder)
    except FormatError as e:
        msg = str(e)
        assert "\n" not in msg and msg.strip(), (corruption.what, msg)
        named = msg.split(": ", 1)[0]
        assert named and (named.startswith(("model", "visual", "language_model", "vision_tower", "quantization_config",
                                            str(folder))) or ".safetensors" in named or "config.json" in named
                          or INDEX_NAME in named or "extra" in named), (corruption.what, msg)
        assert not corruption.mentions or any(m in msg for m in corruption.mentions), (corruption.what, msg)
        return f"error: {msg}"
    # it validated: only the tolerated changes may get here
    assert corruption.tolerated_if, f"{corruption.what}: loads silently"
    if corruption.tolerated_if == "same_schemes":
        assert _effective(folder) == _effective(src), f"{corruption.what}: validates but changes the schemes"
    return "tolerated"


def _run(src: Path, corruptions: list[Corruption], tmp: Path) -> dict[str, str]:
    results = {}
    for i, c in enumerate(corruptions):
        results[c.what] = check(src, c, tmp / f"c{i}")
        shutil.rmtree(tmp / f"c{i}")
    return results


def _sample(src: Path, rng: random.Random, n: int) -> list[str]:
    """`n` random tensors plus one of every tensor class (each module suffix, bias, norm, embedding, experts)."""
    names = sorted(ckpt.lazy_tensors(src))
    by_class: dict[str, list[str]] = {}
    for nm in names:
        last = nm.rpartition(".")[2]
        cls = last if last in ALL_SUFFIXES else ("bias" if last == "bias" else "norm" if "norm" in nm
                                                 else "embed" if "embed" in nm else "other")
        by_class.setdefault(cls + (".experts" if ".experts." in nm else ""), []).append(nm)
    picked = {rng.choice(v) for v in by_class.values()} | set(rng.sample(names, min(n, len(names))))
    return sorted(picked)


@pytest.fixture(scope="module")
def checkpoints(quantized_dir):
    return lambda key: quantized_dir(CHECKPOINTS[key][0], CHECKPOINTS[key][1], **CHECKPOINTS[key][2])


# -- fast tier ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(CHECKPOINTS))
def test_sampled_tensor_corruptions_are_named(key, checkpoints, tmp_path):
    src = checkpoints(key)
    rng = random.Random(f"{SEED}-{key}")
    corruptions = tensor_corruptions(src, _sample(src, rng, FAST_TENSORS), TENSOR_KINDS, rng, FAST_KINDS_PER_TENSOR)
    results = _run(src, corruptions, tmp_path)  # each one: a named error, or a tolerated float cast
    for kind in TENSOR_KINDS:
        assert any(k.startswith(kind) and v.startswith("error") for k, v in results.items()), kind


@pytest.mark.parametrize("key", list(CHECKPOINTS))
def test_config_corruptions_are_named_or_change_nothing(key, checkpoints, tmp_path):
    src = checkpoints(key)
    results = _run(src, config_corruptions(src) + model_config_corruptions(src), tmp_path)
    tolerated = sorted(k for k, v in results.items() if v == "tolerated")
    # every tolerated change is to an informational field (algorithm, ignore, storage deleted, a no-op override)
    assert all(k.split(" ")[0].startswith(("quantization_config.algorithm", "quantization_config.ignore",
                                            "quantization_config.overrides", "quantization_config.storage"))
               for k in tolerated), tolerated
    assert all(k == "quantization_config.storage delete" for k in tolerated if "storage" in k), tolerated


def test_file_corruptions_are_named(checkpoints, tmp_path):
    src = checkpoints("rtn")
    results = _run(src, file_corruptions(src), tmp_path / "single")
    assert all(v.startswith("error") for v in results.values()), results
    sharded = sharded_copy(src, tmp_path / "sharded")
    validate_checkpoint(sharded)
    results = _run(sharded, index_corruptions(sharded), tmp_path / "idx")
    assert all(v.startswith("error") for v in results.values()), results


def test_a_fused_sibling_left_unquantized_is_named(checkpoints, tmp_path):
    """Dropping k_proj from quantized_modules and giving it a full-precision weight: vLLM would fuse a quantized
    q/v with an unquantized k."""
    src = checkpoints("rtn")
    q = ckpt.read_qe_config(src)
    k = next(m for m in q.quantized_modules if m.endswith("self_attn.k_proj"))
    folder = _copy(src, tmp_path / "c")

    def fn(d):
        shape = d.pop(f"{k}.weight_shape").tolist()
        for s in ("weight_packed", "weight_scale", "weight_zero_point"):
            d.pop(f"{k}.{s}")
        d[f"{k}.weight"] = torch.zeros(shape)
    _rewrite(folder, fn)
    _edit_config(folder, lambda c: c["quantization_config"]["quantized_modules"].remove(k))
    _edit_config(folder, lambda c: c["quantization_config"].pop("storage"))
    with pytest.raises(FormatError, match=rf"^{k}: not quantized, but vLLM fuses it with"):
        validate_checkpoint(folder)


# -- exhaustive tier ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("key", list(CHECKPOINTS))
def test_every_tensor_every_corruption(key, checkpoints, tmp_path):
    src = checkpoints(key)
    names = sorted(ckpt.lazy_tensors(src))
    results = _run(src, tensor_corruptions(src, names, TENSOR_KINDS, random.Random(f"{SEED}-{key}-all")), tmp_path)
    assert len(results) >= 4 * len(names)


# -- vLLM tier ---------------------------------------------------------------------------------------------------
VLLM_CASES = {
    "bias deleted": lambda d: d.pop("model.layers.1.self_attn.q_proj.bias"),
    "NaN in the final norm": lambda d: d["model.norm.weight"].__setitem__(0, float("nan")),
    "misspelt tensor": lambda d: d.__setitem__("model.norm.weigth", d.pop("model.norm.weight")),
}


@pytest.mark.vllm
def test_vllm_refuses_corruptions_with_the_validator_line_before_the_engine_starts(checkpoints, tmp_path):
    from tests.helpers.compare import make_requests, run_vllm

    src = checkpoints("rtn")
    cases: list[tuple[str, Callable[[Path], None]]] = [(k, _on("model.safetensors", fn)) for k, fn in
                                                       VLLM_CASES.items()]
    dropped = next(m for m in ckpt.read_qe_config(src).quantized_modules if m.endswith("mlp.down_proj"))
    cases.append(("module dropped from quantized_modules",
                  lambda f: _edit_config(f, lambda c: c["quantization_config"]["quantized_modules"].remove(dropped))))
    cases.append(("truncated safetensors", file_corruptions(src)[4].apply))
    for i, (what, apply) in enumerate(cases):
        folder = tmp_path / f"c{i}"
        shutil.copytree(src, folder)
        apply(folder)
        with pytest.raises(FormatError) as e:
            validate_checkpoint(folder)
        line = str(e.value)
        with pytest.raises(RuntimeError) as r:
            run_vllm(folder, make_requests(folder, tmp_path, n=1), tmp_path, timeout=300)
        err = str(r.value)
        assert err.strip().splitlines()[-1] == f"vllm_qe.format.spec.InvalidCheckpoint: {line}", (what, err[-2000:])
        assert "Initializing a V1 LLM engine" not in err, what


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(2400)  # two full vLLM runs
def test_vllm_answers_a_tolerated_corruption_identically_twice(checkpoints, tmp_path):
    """The final norm stored in float16 (a tolerated cast): two vLLM loads give the same tokens and logprobs."""
    from tests.helpers.compare import make_requests, run_vllm

    src = checkpoints("rtn")
    folder = tmp_path / "c"
    shutil.copytree(src, folder)
    _rewrite(folder, lambda d: d.__setitem__("model.norm.weight", d["model.norm.weight"].half()))
    validate_checkpoint(folder)
    reqs = make_requests(folder, tmp_path, n=2)
    first = run_vllm(folder, reqs, tmp_path)
    assert run_vllm(folder, reqs, tmp_path) == first
