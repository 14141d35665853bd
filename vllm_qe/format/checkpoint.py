"""Checkpoint I/O: atomic writer, validating reader, and the summary behind `vllm-qe inspect`.

Tensors are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_qe.format import spec
from vllm_qe.format.files import INCOMPLETE_MARKER, INDEX_NAME, WEIGHTS_NAME, LazyTensor, checkpoint_tensors
from vllm_qe.format.spec import FormatError, QEConfig
from vllm_qe.format.storage import Storage
from vllm_qe.format.validate import (
    group_module_tensors,
    read_config,
    read_qe_config,
    validate_checkpoint,
    validate_module,
)

__all__ = ["INDEX_NAME", "WEIGHTS_NAME", "CheckpointSummary", "LazyTensor", "group_module_tensors",
           "inspect_checkpoint", "inspect_lines", "lazy_tensors", "load_tensors", "read_config", "read_qe_config",
           "validate_checkpoint", "validate_module", "write_checkpoint"]

PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
    "chat_template.jinja", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "generation_config.json", "vocab.json", "merges.txt",
)
REPORT_NAME = "vllm_qe_report.json"
_STALE = re.compile(r"\.(tmp|old)-[0-9a-f]{8}")


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


def lazy_tensors(model_dir: str | Path) -> dict[str, LazyTensor]:
    """Every tensor of a model folder as a `LazyTensor` (headers only; index-aware, named errors)."""
    return checkpoint_tensors(model_dir)


@dataclass
class CheckpointSummary:
    """What `vllm-qe inspect` prints. Bytes are counted from the stored dtypes."""

    path: str
    config: QEConfig
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (out, in)
    quantized_bytes: int = 0  # packed weights, scales, zero points, smoothing vectors, as stored
    adapter_bytes: int = 0  # shared/routed adapters and routers, as stored
    original_bytes: int = 0  # the quantized modules' weights at 16 bits
    adapter_params: int = 0
    other_bytes: int = 0
    storage: Storage = field(default_factory=Storage)
    arch: str = ""
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
            f"model           {self.arch}",
            f"format          quant_experts v{c.format_version}, algorithm {c.algorithm.get('name')}",
            f"scheme          W{c.weight.bits}{act} ({gs}, {sym}){' + smoothing' if c.smooth else ''}",
            f"modules         {len(self.modules)} quantized, {len(c.ignore)} ignored, "
            f"{len(c.overrides)} override(s)",
            f"adapters        shared rank {a.shared_rank}, {a.num_routed} routed x rank {a.routed_rank} "
            f"({self.adapter_params:,} params, {self.adapter_bytes / 2**20:.2f} MiB as stored)",
            f"linear weights  {self.original_bytes / 2**20:.2f} MiB at 16 bit -> "
            f"{(self.quantized_bytes + self.adapter_bytes) / 2**20:.2f} MiB as stored "
            f"({saved / 2**20:.2f} MiB saved, {saved / max(self.original_bytes, 1):.1%})",
            f"other tensors   {self.other_bytes / 2**20:.2f} MiB (embeddings, norms, biases, ignored layers)",
        ] + self.storage.lines() + self._moe_lines()

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


_ADAPTER_SUFFIXES = (spec.SHARED_A, spec.SHARED_B, spec.ROUTED_A, spec.ROUTED_B, spec.ROUTER)


def inspect_checkpoint(model_dir: str | Path) -> CheckpointSummary:
    """Validate a whole checkpoint (`validate_checkpoint`) and summarise it; raises FormatError naming the first bad
    file, field or tensor."""
    ck = validate_checkpoint(model_dir)
    summary = CheckpointSummary(str(ck.path), ck.config, dict(ck.modules), storage=ck.storage, arch=ck.arch)
    used: set[str] = set()
    for mod, (out_f, in_f) in ck.modules.items():
        summary.original_bytes += out_f * in_f * 2
        for s, n in ck.grouped[mod].items():
            v = ck.tensors[n]
            if s in _ADAPTER_SUFFIXES:
                summary.adapter_bytes += v.nbytes()
                summary.adapter_params += v.numel()
            elif s not in ("bias", spec.WEIGHT_SHAPE):
                summary.quantized_bytes += v.nbytes()
            if s != "bias":
                used.add(n)
    summary.other_bytes = sum(v.nbytes() for k, v in ck.tensors.items() if k not in used)
    summary.moe = _moe_summary(ck.config, summary.modules, ck.grouped, ck.tensors)
    return summary


def inspect_lines(model_dir: str | Path, modules: bool = False) -> list[str]:
    """The text of `vllm-qe inspect DIR` (raises FormatError for an invalid checkpoint); with `modules`, one line
    per quantized module with its shape and stored bits per weight."""
    s = inspect_checkpoint(model_dir)
    out = s.lines()
    if modules:
        out += [f"  {name}  [{o} x {i}]  {s.storage.modules[name][1] / (o * i):.3f} bpw"
                for name, (o, i) in s.modules.items()]
    return out


def _moe_summary(qcfg: QEConfig, modules: dict[str, tuple[int, int]], grouped, tensors) -> dict[str, dict[str, int]]:
    """Per MoE layer (per-expert modules `<experts>.<e>.{gate,up,down}_proj`, validated against the model): sizes
    and adapter parameters."""
    blocks: dict[str, dict[int, dict[str, tuple[int, int]]]] = {}
    for mod, shape in modules.items():
        parsed = spec.parse_expert_name(mod)
        if parsed:
            path, e, proj = parsed
            blocks.setdefault(path, {}).setdefault(e, {})[proj] = shape
    out = {}
    for path, experts in blocks.items():
        n = max(experts) + 1
        i, h = experts[0]["gate_proj"]
        params = sum(tensors[t].numel() for e in range(n) for p in spec.EXPERT_PROJS
                     for s, t in grouped[f"{path}.{e}.{p}"].items() if s in (spec.SHARED_A, spec.SHARED_B))
        out[path] = {"experts": n, "hidden": h, "intermediate": i,
                     "shared_rank": qcfg.module_scheme(f"{path}.0.gate_proj").adapters.shared_rank,
                     "adapter_params": params}
    return out


def remove_stale_writes(out_dir: Path) -> list[Path]:
    """Remove what interrupted writes of `out_dir` left next to it (`OUT.tmp-<id>`, `OUT.old-<id>`); returns them."""
    gone = []
    for p in sorted(out_dir.parent.glob(f"{glob_escape(out_dir.name)}.*-*")):
        if p.is_dir() and _STALE.fullmatch(p.name[len(out_dir.name):]):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _kill_point(step: str) -> None:
    """Called between the writer's steps; the atomicity test replaces it to simulate a kill at each step."""


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
    """Write a checkpoint atomically: build `OUT.tmp-<id>` (marked unfinished), validate it, write `config.json`
    last, unmark it, then rename it onto `OUT`.

    Until the rename the temporary folder carries `.vllm_qe_incomplete` (every reader refuses it) or is a complete,
    validated checkpoint; a kill at any step leaves no folder that passes validation without being a checkpoint.
    Leftovers of interrupted writes of the same `OUT` are removed first. The quantization_config gets its
    `storage` block (bits per weight counted from the written files).

    `tensors` go to one `model.safetensors`; `shards` ((file name, reader) pairs, read one at a time so memory is
    bounded by one shard) to several files plus the `model.safetensors.index.json` that transformers and vLLM read.

    An existing `OUT` is only replaced with `overwrite=True` (it is moved aside first and removed after the rename).
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_writes(out_dir)
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / INCOMPLETE_MARKER).write_text("vllm-qe: this folder is being written; it is not a checkpoint\n")
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
                _kill_point("shard")
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        _kill_point("tensors")
        if source_dir is not None:
            for name in PROCESSOR_FILES:
                src = Path(source_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(_jsonable(report), indent=2))
        cfg = dict(model_config)
        cfg["quantization_config"] = qconfig.to_dict()
        cfg["quantization_config"].pop("storage", None)
        # re-validate what is on disk against the config about to be written
        ck = validate_checkpoint(tmp, model_config=cfg, unfinished_ok=True)
        cfg["quantization_config"]["storage"] = ck.storage.config_block()
        _kill_point("validated")
        _fsync_dir(tmp)
        # config.json last, while still marked unfinished
        _write_synced(tmp / "config.json", json.dumps(cfg, indent=2, sort_keys=False))
        _kill_point("config")
        os.remove(tmp / INCOMPLETE_MARKER)
        _fsync(tmp)
        _kill_point("unmarked")
        old = None
        if out_dir.exists():
            old = out_dir.parent / f"{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
            _kill_point("moved_aside")
        os.rename(tmp, out_dir)
        _fsync(out_dir.parent)
        _kill_point("renamed")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """fsync every file of `path` and the folder itself."""
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync(path)


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
