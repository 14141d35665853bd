"""Checkpoint I/O: atomic writer, validating reader, and the summary behind `vllm-qe inspect`.

Tensors are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_qe.format import spec
from vllm_qe.format.spec import FormatError, QEConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
    "chat_template.jinja", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "generation_config.json", "vocab.json", "merges.txt",
)
REPORT_NAME = "vllm_qe_report.json"


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FormatError(f"{path}: not found (is {model_dir} a model folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: invalid JSON ({e})") from e


def read_qe_config(model_dir: str | Path) -> QEConfig:
    """Parse `config.json`'s `quantization_config` (errors name the file and field)."""
    cfg = read_config(model_dir)
    if "quantization_config" not in cfg:
        raise FormatError(f"{Path(model_dir) / 'config.json'}: no quantization_config (not a vllm-qe checkpoint)")
    try:
        return QEConfig.from_dict(cfg["quantization_config"])
    except FormatError as e:
        raise FormatError(f"{Path(model_dir) / 'config.json'}: {e}") from e


def safetensors_files(model_dir: str | Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FormatError(f"{model_dir}: no *.safetensors files")
    return files


def load_tensors(model_dir: str | Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """All tensors (or only `names`) of a model folder, via safetensors."""
    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                if names is None or k in names:
                    out[k] = sf.get_tensor(k)
    return out


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class LazyTensor:
    """A tensor of a safetensors file known by dtype and shape; its data is read only when `load()` is called
    (validation reads scales, zero points and adapters, never the packed weights)."""

    def __init__(self, path: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.name, self.dtype, self.shape = path, name, dtype, torch.Size(shape)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def load(self) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as sf:
            return sf.get_tensor(self.name)


def lazy_tensors(model_dir: str | Path) -> dict[str, LazyTensor]:
    """Every tensor of a model folder as a `LazyTensor` (headers only)."""
    out: dict[str, LazyTensor] = {}
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118
                sl = sf.get_slice(k)
                dt = sl.get_dtype()
                if dt not in _ST_DTYPES:
                    raise FormatError(f"{f.name}: tensor {k} has unsupported dtype {dt}")
                out[k] = LazyTensor(f, k, _ST_DTYPES[dt], tuple(sl.get_shape()))
    return out


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


def validate_module(name: str, tensors: dict[str, torch.Tensor], scheme: spec.ModuleScheme) -> None:
    """Check presence, dtype, shape and values of one module's tensors (keys are suffixes)."""
    if spec.WEIGHT_SHAPE not in tensors:
        raise FormatError(f"{name}.{spec.WEIGHT_SHAPE}: missing")
    ws = tensors[spec.WEIGHT_SHAPE]
    if ws.dtype != torch.int64 or tuple(ws.shape) != (2,):
        raise FormatError(f"{name}.{spec.WEIGHT_SHAPE}: expected int64 [2], found {ws.dtype} {list(ws.shape)}")
    out_f, in_f = (int(v) for v in _value(ws))
    expected = spec.expected_tensors(scheme, out_f, in_f)
    for suffix, (dtype, shape) in expected.items():
        if suffix not in tensors:
            raise FormatError(f"{name}.{suffix}: missing")
        t = tensors[suffix]
        if t.dtype != dtype:
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


@dataclass
class CheckpointSummary:
    """What `vllm-qe inspect` prints."""

    path: str
    config: QEConfig
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (out, in)
    quantized_bytes: int = 0
    adapter_bytes: int = 0
    original_bytes: int = 0
    adapter_params: int = 0
    other_bytes: int = 0
    # MoE: experts path -> {"experts": E, "hidden": H, "intermediate": I, "shared_rank": r, "adapter_params": n}
    moe: dict[str, dict[str, int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        c = self.config
        act = "A16" if c.activation is None else f"A{c.activation.bits} ({c.activation.scheme})"
        gs = "per-channel" if c.weight.group_size == -1 else f"group {c.weight.group_size}"
        sym = "symmetric" if c.weight.symmetric else "asymmetric"
        saved = self.original_bytes - self.quantized_bytes - self.adapter_bytes
        a = c.adapters
        return [
            f"checkpoint      {self.path}",
            f"format          quant_experts v{c.format_version}, algorithm {c.algorithm.get('name')}",
            f"scheme          W{c.weight.bits}{act} ({gs}, {sym}){' + smoothing' if c.smooth else ''}",
            f"modules         {len(self.modules)} quantized, {len(c.ignore)} ignored, "
            f"{len(c.overrides)} override(s)",
            f"adapters        shared rank {a.shared_rank}, {a.num_routed} routed x rank {a.routed_rank} "
            f"({self.adapter_params:,} params, {self.adapter_bytes / 2**20:.2f} MiB)",
            f"linear weights  {self.original_bytes / 2**20:.2f} MiB at 16 bit -> "
            f"{(self.quantized_bytes + self.adapter_bytes) / 2**20:.2f} MiB "
            f"({saved / 2**20:.2f} MiB saved, {saved / max(self.original_bytes, 1):.1%})",
            f"other tensors   {self.other_bytes / 2**20:.2f} MiB (embeddings, norms, ignored layers)",
        ] + self._moe_lines()

    def _moe_lines(self) -> list[str]:
        if not self.moe:
            return []
        shapes = sorted({(m["experts"], m["hidden"], m["intermediate"], m["shared_rank"]) for m in self.moe.values()})
        n_params = sum(m["adapter_params"] for m in self.moe.values())
        out = [f"moe experts     {len(self.moe)} MoE layer(s), weight-only, per-expert modules "
               f"(gate/up/down), {n_params:,} adapter params"]
        out += [f"                {e} experts x (hidden {h}, intermediate {i}), shared rank {r} per expert projection"
                for e, h, i, r in shapes]
        return out


def inspect_checkpoint(model_dir: str | Path) -> CheckpointSummary:
    """Validate a whole checkpoint and summarise it; raises FormatError naming the first bad module/tensor.

    Reads tensor headers, and the data of scales, zero points, shapes and adapters only (not packed weights)."""
    model_dir = Path(model_dir)
    qcfg = read_qe_config(model_dir)
    tensors = lazy_tensors(model_dir)
    grouped = group_module_tensors(set(tensors), qcfg.quantized_modules)
    summary = CheckpointSummary(str(model_dir), qcfg)
    used: set[str] = set()
    for mod in qcfg.quantized_modules:
        if mod not in grouped:
            raise FormatError(f"{mod}.{spec.WEIGHT_PACKED}: missing (module listed in quantized_modules)")
        if f"{mod}.weight" in tensors:
            raise FormatError(f"{mod}.weight: a quantized module must not also carry a full-precision weight")
        t = {s: tensors[n] for s, n in grouped[mod].items()}
        scheme = qcfg.module_scheme(mod)
        validate_module(mod, t, scheme)
        used.update(grouped[mod].values())
        out_f, in_f = (int(v) for v in _value(t[spec.WEIGHT_SHAPE]))
        summary.modules[mod] = (out_f, in_f)
        summary.original_bytes += out_f * in_f * 2
        for s, v in t.items():
            nbytes = v.numel() * v.element_size()
            if s in (spec.SHARED_A, spec.SHARED_B, spec.ROUTED_A, spec.ROUTED_B, spec.ROUTER):
                summary.adapter_bytes += v.numel() * 2  # served in 16-bit
                summary.adapter_params += v.numel()
            elif s not in ("bias", spec.WEIGHT_SHAPE):
                summary.quantized_bytes += nbytes
    summary.other_bytes = sum(v.numel() * v.element_size() for k, v in tensors.items() if k not in used)
    summary.moe = _moe_summary(qcfg, summary.modules, grouped, tensors)
    return summary


def _moe_summary(qcfg: QEConfig, modules: dict[str, tuple[int, int]], grouped, tensors) -> dict[str, dict[str, int]]:
    """Per MoE layer (per-expert modules `<experts>.<e>.{gate,up,down}_proj`): check that every expert has all three
    projections with consistent shapes, and summarise them."""
    blocks: dict[str, dict[int, dict[str, tuple[int, int]]]] = {}
    for mod, shape in modules.items():
        parsed = spec.parse_expert_name(mod)
        if parsed:
            path, e, proj = parsed
            blocks.setdefault(path, {}).setdefault(e, {})[proj] = shape
    out = {}
    for path, experts in blocks.items():
        n = max(experts) + 1
        for e in range(n):
            have = experts.get(e, {})
            missing = [p for p in spec.EXPERT_PROJS if p not in have]
            if missing:
                raise FormatError(f"{path}.{e}.{missing[0]}: missing (MoE layers carry every expert's gate/up/down)")
            (i1, h1), (i2, h2), (h3, i3) = have["gate_proj"], have["up_proj"], have["down_proj"]
            if not (i1 == i2 == i3 and h1 == h2 == h3) or have != experts[0]:
                raise FormatError(f"{path}.{e}: inconsistent expert shapes {have} (expected gate/up [I, H], "
                                  f"down [H, I], the same for every expert)")
        i, h = experts[0]["gate_proj"]
        params = sum(tensors[t].numel() for e in range(n) for p in spec.EXPERT_PROJS
                     for s, t in grouped[f"{path}.{e}.{p}"].items() if s in (spec.SHARED_A, spec.SHARED_B))
        out[path] = {"experts": n, "hidden": h, "intermediate": i,
                     "shared_rank": qcfg.module_scheme(f"{path}.0.gate_proj").adapters.shared_rank,
                     "adapter_params": params}
    return out


def write_checkpoint(
    out_dir: str | Path,
    *,
    model_config: dict[str, Any],
    qconfig: QEConfig,
    tensors: dict[str, torch.Tensor] | None = None,
    shards: list[tuple[str, Callable[[], dict[str, torch.Tensor]]]] | None = None,
    source_dir: str | Path | None = None,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint atomically: build `OUT.tmp-*`, validate it, then rename onto `OUT`.

    `tensors` go to one `model.safetensors`; `shards` ((file name, reader) pairs, read one at a time so memory is
    bounded by one shard) to several files plus the `model.safetensors.index.json` that transformers and vLLM read.

    An existing `OUT` is only replaced with `overwrite=True` (it is moved aside first and removed after the rename).
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        qconfig.validate()
        if (tensors is None) == (shards is None):
            raise ValueError("write_checkpoint: give either tensors or shards")
        if tensors is not None:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME),
                      metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for fname, read in shards:
                part = read()
                save_file({k: v.contiguous() for k, v in part.items()}, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(part, fname))
                total += sum(v.numel() * v.element_size() for v in part.values())
                del part
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        if source_dir is not None:
            for name in PROCESSOR_FILES:
                src = Path(source_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(_jsonable(report), indent=2))
        cfg = dict(model_config)
        cfg["quantization_config"] = qconfig.to_dict()
        # config.json last: a folder without it is never mistaken for a model.
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=False))
        inspect_checkpoint(tmp)
        _fsync_dir(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f"{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x
