"""Whole-checkpoint validation: the one check behind `vllm-qe inspect`, the writer and the vLLM plugin's
pre-engine hook. Every failure is a one-line `FormatError` naming the file, tensor or field.

What is checked (docs/checkpoint-format.md, "Validation"):
- the folder is not an unfinished write (no `.vllm_qe_incomplete` marker);
- `quantization_config` parses (every field present, typed and in range);
- the safetensors headers are sound (no empty or truncated file), every shard of the index exists and the index
  agrees with the files;
- each quantized module carries exactly the tensors its scheme implies, with their dtype and shape, finite positive
  scales, zero points below 2^bits, finite adapters and smoothing vectors;
- the model's own tensors: the Hugging Face model named by `config.json` is instantiated on the `meta` device and
  every parameter it has (embeddings, norms, biases — of quantized modules too —, vision tower, lm_head unless tied)
  must be on disk with its shape and a floating dtype, or be a quantized module whose `weight_shape` is the
  parameter's shape; a tensor the model does not have is an error (a misspelt name, a quantized module missing from
  `quantized_modules`);
- modules vLLM fuses into one layer (q/k/v, gate/up) are quantized together, with one scheme and equal smoothing;
- every floating tensor is finite (data read per tensor, in slices);
- the recorded `storage` block, when present, matches the stored tensors.
"""

from __future__ import annotations

import functools
import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_qe.format import spec
from vllm_qe.format.files import INCOMPLETE_MARKER, LazyTensor, checkpoint_tensors
from vllm_qe.format.spec import FormatError, QEConfig
from vllm_qe.format.storage import Storage, count_storage

# Module names vLLM fuses into one layer (its packed_modules_mapping for the supported models).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


# -- config ------------------------------------------------------------------------------------------------------
def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FormatError(f"{path}: not found (is {model_dir} a model folder?)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return cfg


def parse_qe_config(cfg: dict[str, Any], where: str) -> QEConfig:
    """`quantization_config` of a model config dict (errors are prefixed with `where`, e.g. the file)."""
    if "quantization_config" not in cfg:
        raise FormatError(f"{where}: no quantization_config (not a vllm-qe checkpoint)")
    try:
        return QEConfig.from_dict(cfg["quantization_config"])
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from e


def read_qe_config(model_dir: str | Path) -> QEConfig:
    """Parse `config.json`'s `quantization_config` (errors name the file and field)."""
    return parse_qe_config(read_config(model_dir), str(Path(model_dir) / "config.json"))


# -- one quantized module ----------------------------------------------------------------------------------------
def _value(t: torch.Tensor | LazyTensor) -> torch.Tensor:
    return t.load() if isinstance(t, LazyTensor) else t


def group_module_tensors(names: list[str] | set[str], modules: list[str]) -> dict[str, dict[str, str]]:
    """module -> {suffix: full tensor name} for every tensor whose name is `module.<format suffix>`."""
    mods = set(modules)
    grouped: dict[str, dict[str, str]] = defaultdict(dict)
    for n in names:
        mod, _, suffix = n.rpartition(".")
        if mod in mods:
            grouped[mod][suffix] = n
    return grouped


def validate_module(name: str, tensors: dict[str, torch.Tensor | LazyTensor], scheme: spec.ModuleScheme) -> None:
    """Check presence, dtype, shape and values of one module's tensors (keys are suffixes; `bias` is ignored
    here and checked against the model)."""
    if spec.WEIGHT_SHAPE not in tensors:
        raise FormatError(f"{name}.{spec.WEIGHT_SHAPE}: missing")
    ws = tensors[spec.WEIGHT_SHAPE]
    if ws.dtype != torch.int64 or tuple(ws.shape) != (2,):
        raise FormatError(f"{name}.{spec.WEIGHT_SHAPE}: expected int64 [2], found {ws.dtype} {list(ws.shape)}")
    out_f, in_f = (int(v) for v in _value(ws))
    if out_f <= 0 or in_f <= 0:
        raise FormatError(f"{name}.{spec.WEIGHT_SHAPE}: must be positive, found [{out_f}, {in_f}]")
    expected = spec.expected_tensors(scheme, out_f, in_f)
    for suffix, (dtype, shape) in expected.items():
        if suffix not in tensors:
            raise FormatError(f"{name}.{suffix}: missing")
        t = tensors[suffix]
        legacy = suffix in spec.ADAPTER_SUFFIXES and t.dtype == spec.LEGACY_ADAPTER_DTYPE
        if t.dtype != dtype and not legacy:
            raise FormatError(f"{name}.{suffix}: expected dtype {dtype}, found {t.dtype}")
        if tuple(t.shape) != shape:
            raise FormatError(f"{name}.{suffix}: expected shape {list(shape)}, found {list(t.shape)}")
    extra = sorted(set(tensors) - set(expected) - {"bias"})
    if extra:
        raise FormatError(f"{name}.{extra[0]}: unexpected tensor for this module's scheme")
    scale = _value(tensors[spec.WEIGHT_SCALE]).float()
    if not torch.isfinite(scale).all():
        raise FormatError(f"{name}.{spec.WEIGHT_SCALE}: contains NaN or Inf")
    if (scale <= 0).any():
        raise FormatError(f"{name}.{spec.WEIGHT_SCALE}: contains non-positive scales")
    if spec.WEIGHT_ZERO in tensors and int(_value(tensors[spec.WEIGHT_ZERO]).max()) >= 2**scheme.weight.bits:
        raise FormatError(f"{name}.{spec.WEIGHT_ZERO}: zero point >= 2^{scheme.weight.bits}")
    for suffix in (spec.SMOOTH_SCALE, spec.SHARED_A, spec.SHARED_B, spec.ROUTED_A, spec.ROUTED_B, spec.ROUTER):
        if suffix in tensors and not torch.isfinite(_value(tensors[suffix])).all():
            raise FormatError(f"{name}.{suffix}: contains NaN or Inf")
    if spec.SMOOTH_SCALE in tensors and (_value(tensors[spec.SMOOTH_SCALE]) <= 0).any():
        raise FormatError(f"{name}.{spec.SMOOTH_SCALE}: contains non-positive scales")


# -- the model's tensors -----------------------------------------------------------------------------------------
@dataclass
class ModelTensors:
    """The parameters a Hugging Face model built from a config has, and how checkpoint names map onto them."""

    arch: str
    params: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # in-memory name -> (dtype, shape)
    optional: set[str]  # tied parameters (lm_head when tie_word_embeddings)
    to_model: Callable[[str], tuple[str, bool]]  # checkpoint name -> (in-memory name, a converter reshapes it)
    to_disk: Callable[[str], str]  # in-memory name -> checkpoint name (for messages)
    ignorable: Callable[[str], bool] = lambda key: False  # the class ignores this unexpected in-memory name


def model_tensors(model_config: dict[str, Any]) -> ModelTensors:
    """Instantiate the model of `model_config` (config.json contents) on the meta device (no memory, no data) and
    take its state dict; the renamings transformers applies when loading map checkpoint names onto it. Cached per
    config (the answer depends on nothing else)."""
    cfg = {k: v for k, v in model_config.items() if k != "quantization_config"}
    try:
        key = json.dumps(cfg, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise FormatError(f"config.json: not JSON-serialisable ({e})") from e
    return _model_tensors(key)


@functools.lru_cache(maxsize=8)
def _model_tensors(cfg_json: str) -> ModelTensors:
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    cfg = json.loads(cfg_json)
    mtype = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if not isinstance(mtype, str) or mtype not in transformers.CONFIG_MAPPING:
        raise FormatError(f"config.json: model_type: {mtype!r} is not a model transformers "
                          f"{transformers.__version__} knows (the validator builds the model to know its tensors)")
    if not (isinstance(archs, list) and archs and isinstance(archs[0], str) and hasattr(transformers, archs[0])):
        raise FormatError(f"config.json: architectures: {archs!r} does not name a transformers model class")
    try:
        config = transformers.CONFIG_MAPPING[mtype].from_dict(cfg)
        with torch.device("meta"):
            model = getattr(transformers, archs[0])._from_config(config)
    except Exception as e:  # noqa: BLE001 (any failure of transformers to build from this config)
        raise FormatError(f"config.json: cannot build {archs[0]} from it ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e
    sd = model.state_dict()
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = getattr(torch, dtype, torch.float32) if isinstance(dtype, str) else torch.float32
    params = {k: (dtype if v.dtype.is_floating_point else v.dtype, tuple(v.shape)) for k, v in sd.items()}
    optional = set(getattr(model, "all_tied_weights_keys", None) or {})
    # keys the model class itself declares optional on load / ignorable when present
    may_miss = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    optional |= {k for k in params if any(p.search(k) for p in may_miss)}
    may_extra = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    conv = get_model_conversion_mapping(model)
    renamings = [c for c in conv if isinstance(c, WeightRenaming)]
    converters = [c for c in conv if isinstance(c, WeightConverter)]
    prefix = model.base_model_prefix

    def to_model(name: str) -> tuple[str, bool]:
        key, pattern = rename_source_key(name, renamings, converters, prefix, sd)
        return key, pattern is not None

    def to_disk(key: str) -> str:
        from transformers.core_model_loading import revert_weight_conversion

        try:
            names = list(revert_weight_conversion(model, {key: torch.empty(params[key][1], device="meta")}))
        except Exception:  # noqa: BLE001 (message only)
            return key
        return names[0] if len(names) == 1 else key

    return ModelTensors(archs[0], params, optional, to_model, to_disk,
                        lambda key: any(p.search(key) for p in may_extra))


def _fmt(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


# -- the whole checkpoint ----------------------------------------------------------------------------------------
@dataclass
class ValidatedCheckpoint:
    """A checkpoint that passed `validate_checkpoint`, with what was learnt on the way."""

    path: Path
    config: QEConfig
    tensors: dict[str, LazyTensor]
    grouped: dict[str, dict[str, str]]  # quantized module -> {suffix: tensor name}
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)  # quantized module -> (out, in)
    storage: Storage | None = None
    arch: str = ""


def validate_checkpoint(model_dir: str | Path, *, model_config: dict[str, Any] | None = None,
                        check_values: bool = True, unfinished_ok: bool = False) -> ValidatedCheckpoint:
    """Validate a whole checkpoint folder; raises `FormatError` naming the first bad file, tensor or field.

    `model_config` replaces `config.json` and `unfinished_ok` skips the unfinished-write marker (the writer validates
    its temporary folder before config.json exists).
    Reads the safetensors headers, the small tensors of quantized modules, and — with `check_values` — the data of
    every floating tensor (per tensor, in slices) for finiteness; never the packed integer weights."""
    model_dir = Path(model_dir)
    if not unfinished_ok and (model_dir / INCOMPLETE_MARKER).exists():
        raise FormatError(f"{model_dir}: an unfinished write ({INCOMPLETE_MARKER} present), not a checkpoint; the "
                          "writer removes such folders on its next run")
    where = str(model_dir / "config.json")
    cfg = read_config(model_dir) if model_config is None else model_config
    qcfg = parse_qe_config(cfg, where)
    tensors = checkpoint_tensors(model_dir)
    out = ValidatedCheckpoint(model_dir, qcfg, tensors, group_module_tensors(set(tensors), qcfg.quantized_modules))
    _check_quantized_modules(out)
    model = model_tensors(cfg)
    out.arch = model.arch
    _check_model_tensors(out, model)
    _check_fused(out, model)
    if check_values:
        _check_finite(out)
    out.storage = count_storage(qcfg, tensors, out.grouped, out.modules)
    recorded = qcfg.storage
    if recorded is not None and recorded != out.storage.config_block():
        mine = out.storage.config_block()
        diff = next((k for k in mine if recorded.get(k) != mine[k]), None)
        have, want = recorded.get(diff), mine.get(diff)
        if diff is None:
            diff = sorted(set(recorded) - set(mine))[0]
            have, want = recorded[diff], "no such field"
        elif isinstance(have, dict) and isinstance(want, dict):
            mod = next(m for m in sorted(set(have) | set(want)) if have.get(m) != want.get(m))
            diff, have, want = f"{diff}[{mod!r}]", have.get(mod, "nothing"), want.get(mod, "no such module")
        have, want = (v if isinstance(v, str) and v in ("nothing", "no such field", "no such module")
                      else json.dumps(v, default=str) for v in (have, want))
        raise FormatError(f"{where}: quantization_config.storage.{diff}: recorded {have[:60]}, the stored "
                          f"tensors give {want[:60]}")
    return out


def _check_quantized_modules(ck: ValidatedCheckpoint) -> None:
    qcfg, tensors = ck.config, ck.tensors
    seen: set[str] = set()
    for mod in qcfg.quantized_modules:
        if mod in seen:
            raise FormatError(f"quantization_config.quantized_modules: {mod} listed twice")
        seen.add(mod)
        if mod not in ck.grouped:
            raise FormatError(f"{mod}.{spec.WEIGHT_PACKED}: missing (module listed in quantized_modules)")
        if f"{mod}.weight" in tensors:
            raise FormatError(f"{mod}.weight: a quantized module must not also carry a full-precision weight")
        if qcfg.is_ignored(mod):
            raise FormatError(f"quantization_config.quantized_modules: {mod} also matches quantization_config.ignore")
        t = {s: tensors[n] for s, n in ck.grouped[mod].items()}
        validate_module(mod, t, qcfg.module_scheme(mod))
        ck.modules[mod] = tuple(int(v) for v in t[spec.WEIGHT_SHAPE].load())  # type: ignore[assignment]


def _check_model_tensors(ck: ValidatedCheckpoint, model: ModelTensors) -> None:
    """Every parameter of the model is on disk (or is a quantized module of the right shape) and every tensor on
    disk is a parameter of the model."""
    covered: dict[str, str] = {}  # in-memory name -> checkpoint name that provides it
    same: dict[str, str] = {}  # in-memory name -> the checkpoint name it has (renaming only), to name missing ones
    quant_suffixes = set(spec.ALL_SUFFIXES)
    # quantized modules -> the model weights they stand for
    experts: dict[str, dict[int, dict[str, tuple[int, int]]]] = defaultdict(lambda: defaultdict(dict))
    for mod, (out_f, in_f) in ck.modules.items():
        key, _ = model.to_model(f"{mod}.weight")
        if key in model.params:
            dtype, shape = model.params[key]
            if shape != (out_f, in_f):
                raise FormatError(f"{mod}.{spec.WEIGHT_SHAPE}: [{out_f}, {in_f}] but the model's {mod}.weight is "
                                  f"{list(shape)}")
            covered[key] = f"{mod}.{spec.WEIGHT_PACKED}"
            same[key] = f"{mod}.weight"
            continue
        parsed = spec.parse_expert_name(mod)
        if parsed is None:
            raise FormatError(f"{mod}: listed in quantization_config.quantized_modules, but {model.arch} has no "
                              f"such linear layer")
        path, e, proj = parsed
        experts[path][e][proj] = (out_f, in_f)
    for path, by_expert in experts.items():
        _check_experts(path, by_expert, model, covered)
    # every other tensor on disk is a model parameter
    in_module = {n for g in ck.grouped.values() for s, n in g.items() if s != "bias"}
    for name in sorted(ck.tensors):
        if name in in_module:
            continue
        mod, _, suffix = name.rpartition(".")
        if suffix in quant_suffixes:
            raise FormatError(f"{name}: tensor of a quantized module, but {mod} is not listed in "
                              f"quantization_config.quantized_modules")
        key, converted = model.to_model(name)
        t = ck.tensors[name]
        if key not in model.params:
            if model.ignorable(key):
                continue
            raise FormatError(f"{name}: unexpected tensor ({model.arch} has no such parameter)")
        if key in covered:
            raise FormatError(f"{name}: the model's {key} is already provided by {covered[key]}")
        dtype, shape = model.params[key]
        swapped = shape[:-2] + shape[-2:][::-1] if len(shape) >= 2 else shape
        if tuple(t.shape) != shape and not (converted and tuple(t.shape) == swapped):
            raise FormatError(f"{name}: expected shape {list(shape)}, found {list(t.shape)}")
        if dtype.is_floating_point and not t.dtype.is_floating_point:
            raise FormatError(f"{name}: expected a floating dtype, found {t.dtype}")
        if not dtype.is_floating_point and t.dtype != dtype:
            raise FormatError(f"{name}: expected dtype {dtype}, found {t.dtype}")
        covered[key] = same[key] = name
    missing = sorted(set(model.params) - set(covered) - model.optional)
    if missing:
        key = missing[0]
        raise FormatError(f"{_disk_name(key, same, model)}: missing (the model expects {_fmt(*model.params[key])})")


def _disk_name(key: str, same: dict[str, str], model: ModelTensors) -> str:
    """The checkpoint name of a missing model parameter, by the renaming seen on the tensors that are present
    (longest matching prefix), else by transformers' reverse conversion."""
    best = ("", "")
    for k, disk in same.items():
        n = 0  # length of the common suffix of k and disk, at a dot
        while n < min(len(k), len(disk)) and k[len(k) - 1 - n] == disk[len(disk) - 1 - n]:
            n += 1
        tail = k[len(k) - n:]
        cut = tail.find(".")
        if cut < 0:
            continue
        pm, pd = k[:len(k) - n + cut], disk[:len(disk) - n + cut]
        if key.startswith(pm + ".") and len(pm) > len(best[0]):
            best = (pm, pd)
    return best[1] + key[len(best[0]):] if best[0] else model.to_disk(key)


def _check_experts(path: str, by_expert: dict[int, dict[str, tuple[int, int]]], model: ModelTensors,
                   covered: dict[str, str]) -> None:
    """Per-expert modules `<path>.<e>.{gate,up,down}_proj` stand for the model's fused `gate_up_proj` and
    `down_proj` of `path`: every expert, every projection, shapes [I, H] / [I, H] / [H, I]."""
    gu, _ = model.to_model(f"{path}.gate_up_proj")
    dn, _ = model.to_model(f"{path}.down_proj")
    if gu not in model.params or dn not in model.params:
        raise FormatError(f"{path}.{min(by_expert)}.gate_proj: listed in quantization_config.quantized_modules, but "
                          f"{model.arch} has no fused experts {path}")
    (_, s_gu), (_, s_dn) = model.params[gu], model.params[dn]
    n_exp = s_gu[0]
    if s_gu[1] == 2 * s_dn[2] and s_gu[2] == s_dn[1]:  # [E, 2I, H] and [E, H, I]
        inter, hidden = s_dn[2], s_dn[1]
    else:  # [E, H, 2I] and [E, I, H]
        inter, hidden = s_dn[1], s_dn[2]
    want = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for e in range(n_exp):
        have = by_expert.get(e, {})
        for proj, shape in want.items():
            if proj not in have:
                raise FormatError(f"{path}.{e}.{proj}: missing (a quantized MoE layer carries every expert's "
                                  f"gate/up/down; {path} has {n_exp} experts)")
            if have[proj] != shape:
                raise FormatError(f"{path}.{e}.{proj}.{spec.WEIGHT_SHAPE}: {list(have[proj])} but the model's "
                                  f"experts need {list(shape)}")
    extra = sorted(e for e in by_expert if e >= n_exp)
    if extra:
        raise FormatError(f"{path}.{extra[0]}.gate_proj: expert {extra[0]} but {path} has {n_exp} experts")
    covered[gu] = f"{path}.*.gate_proj/up_proj"
    covered[dn] = f"{path}.*.down_proj"


def _check_fused(ck: ValidatedCheckpoint, model: ModelTensors) -> None:
    """Modules vLLM runs as one layer (q/k/v, gate/up; per MoE expert too): all quantized or none, one scheme,
    equal smoothing vectors."""
    qcfg = ck.config
    quantized = set(ck.modules)
    done: set[str] = set()
    for mod in ck.modules:
        head, _, proj = mod.rpartition(".")
        group = next((g for g in FUSED_GROUPS if proj in g), None)
        if group is None or mod in done:
            continue
        sibs = [f"{head}.{p}" for p in group]
        exists = [s for s in sibs if s in quantized or model.to_model(f"{s}.weight")[0] in model.params
                  or spec.parse_expert_name(s) is not None]
        done.update(exists)
        not_q = [s for s in exists if s not in quantized]
        if not_q:
            raise FormatError(f"{not_q[0]}: not quantized, but vLLM fuses it with {mod} into one layer (quantize "
                              f"{'/'.join(group)} together or not at all)")
        schemes = [qcfg.module_scheme(s) for s in exists]
        for s, sch in zip(exists[1:], schemes[1:]):
            if sch != schemes[0]:
                raise FormatError(f"{s}: scheme differs from {exists[0]}'s; vLLM fuses {'/'.join(group)} into one "
                                  f"layer with one scheme")
        if schemes[0].smooth:
            ref = ck.tensors[ck.grouped[exists[0]][spec.SMOOTH_SCALE]].load()
            for s in exists[1:]:
                if not torch.equal(ck.tensors[ck.grouped[s][spec.SMOOTH_SCALE]].load(), ref):
                    raise FormatError(f"{s}.{spec.SMOOTH_SCALE}: differs from {exists[0]}.{spec.SMOOTH_SCALE} "
                                      f"(vLLM fuses {'/'.join(group)} and divides their input once)")


def _check_finite(ck: ValidatedCheckpoint) -> None:
    """Every floating tensor outside the quantized modules (their float tensors are checked per module) is
    finite; read per tensor, in slices."""
    in_module = {n for g in ck.grouped.values() for s, n in g.items() if s != "bias"}
    for name in sorted(ck.tensors):
        t = ck.tensors[name]
        if name in in_module or not t.dtype.is_floating_point:
            continue
        for chunk in t.chunks():
            if not torch.isfinite(chunk).all():
                raise FormatError(f"{name}: contains NaN or Inf")

