"""The calibration plan: which modules are quantized, with which algorithm and settings, in which order — computed
once from the model's structure and the config, before any data is read (`vllm-qe calibrate --dry-run` prints
it). Everything downstream (layer loop, block calibration, writer) asks the plan; nothing re-derives it."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_qe.calibration.algorithms.base import Algorithm
from vllm_qe.calibration.config import CalibrationConfig
from vllm_qe.calibration.model_structure import Chain, checkpoint_names, expert_checkpoint_names, get_chains
from vllm_qe.format.spec import (
    EXPERT_OVERRIDE,
    ActivationScheme,
    ModuleScheme,
    QEConfig,
    WeightScheme,
    matches_any,
    parse_expert_name,
)

# (in-memory parameter name, shape) -> (checkpoint tensor name, transposed): an offloaded model's own index
Locate = Callable[[str, tuple[int, ...]], tuple[str, bool]]


def source_tensor(disk_name: str) -> str:
    """The model-folder tensor a quantized module is made from: `<name>.weight`, or for a per-expert module the
    fused experts' `gate_up_proj` / `down_proj`."""
    parsed = parse_expert_name(disk_name)
    if parsed is None:
        return f"{disk_name}.weight"
    path, _, proj = parsed
    return f"{path}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"


def _expert_override(algo: Algorithm, act: ActivationScheme | None) -> dict[str, Any]:
    """The scheme override of MoE expert modules: weight-only (the VEQ settings; the MoE method has no activation
    quantization), the algorithm's expert adapters (QE: a shared low-rank expert per MoE expert, no routed ones:
    the MoE router already makes every expert token-dependent) and whether the algorithm smooths experts."""
    ov: dict[str, Any] = {"adapters": asdict(algo.expert_adapters), "smooth": algo.uses_smoothing(False)}
    if act is not None:
        ov["activation"] = None
    return ov


@dataclass
class CalibrationPlan:
    """`chains`: the chains to calibrate, in order (vision → connector → language); `disk`: in-memory module name
    -> checkpoint name of every linear layer and per-expert module; `in_chains`: the modules inside the chains;
    `qconfig`: the checkpoint's scheme (defaults + overrides; the module lists are filled when writing)."""

    config: CalibrationConfig
    algorithm: Algorithm
    qconfig: QEConfig
    chains: list[Chain]
    disk: dict[str, str]
    in_chains: set[str]
    all_linears: list[str]
    experts: dict[str, str] = field(default_factory=dict)

    def scheme_of(self, name: str) -> ModuleScheme | None:
        """The scheme of in-memory module `name`; None = left in full precision."""
        if name not in self.in_chains or self.qconfig.is_ignored(self.disk[name]) \
                or matches_any(name, self.config.ignore):
            return None
        return self.qconfig.module_scheme(self.disk[name])

    @property
    def needs_gradients(self) -> bool:
        """The gradient pass runs first (TLQ token importance, MBQ / VEQ modality ratios)."""
        return bool(self.config.token_importance) or self.algorithm.needs_gradients

    @property
    def gamma(self) -> float:
        """VEQ's text/vision ratio when no gradient pass gives it (an algorithm's `gamma` parameter, else 1)."""
        return float(getattr(self.algorithm.config, "gamma", 1.0))

    def final_qconfig(self, stored: dict[str, ModuleScheme]) -> QEConfig:
        """The checkpoint's scheme once the modules in `stored` (in-memory name -> the scheme its tensors realise,
        `QuantizedLinear.stored_scheme`) are done: the module lists filled, the expert override dropped when no
        expert was quantized, and an override for every module whose stored scheme differs from the planned one
        (an input group that chose an unsmoothed base, adapters trimmed to what helps: `stored_overrides`)."""
        q = dataclasses.replace(self.qconfig, overrides=dict(self.qconfig.overrides))
        done = set(stored)
        q.quantized_modules = sorted(self.disk[n] for n in stored)
        q.ignore = sorted(self.disk[n] for n in self.all_linears if n not in done)
        q.ignore += sorted({self.disk[n].rsplit(".", 2)[0] for n in self.experts if n not in done})
        if not any(parse_expert_name(n) for n in stored):
            q.overrides.pop(EXPERT_OVERRIDE, None)
        by_disk = {self.disk[n]: s for n, s in stored.items()}
        differ = {m for m, s in by_disk.items() if s != q.module_scheme(m)}
        if differ:
            q.overrides = {**stored_overrides(by_disk, differ), **q.overrides}
            for m in sorted(differ):  # a planned exact-name entry wins over a `re:` one: replace it
                if q.module_scheme(m) != by_disk[m]:
                    q.overrides[m] = scheme_override(by_disk[m])
            used = {q.override_key(m) for m in by_disk}  # planned entries every module now bypasses: dropped
            q.overrides = {k: v for k, v in q.overrides.items() if k in used or k == EXPERT_OVERRIDE}
        q.validate()
        return q

    def lines(self) -> list[str]:
        """The plan as text: algorithm and settings, statistics and passes, then every block in order with the
        modules quantized in it and their scheme."""
        c, a = self.config, self.algorithm
        act = f"A{c.abits}" if c.abits is not None else "A16"
        out = [f"method {a.name}: {a.config}",
               f"scheme W{c.wbits}{act}, group {c.group_size}, {'symmetric' if c.symmetric else 'asymmetric'}; "
               f"adapters {asdict(a.adapters)}; smoothing {a.uses_smoothing(c.abits is not None)}",
               f"data {c.num_samples} samples of {c.calib} (seed {c.seed}); propagate {c.propagate}; "
               f"gradient pass {'yes' if self.needs_gradients else 'no'}"
               f"{f' (token importance {c.token_importance})' if c.token_importance else ''}; "
               f"weights {'offloaded (streamed per block)' if c.offload else 'in memory'}"]
        if EXPERT_OVERRIDE in self.qconfig.overrides:
            out.append(f"MoE experts: {self.qconfig.overrides[EXPERT_OVERRIDE]}")
        index = 0
        n_modules = 0
        for chain in self.chains:
            for name, unit in chain.units:
                index += 1
                mods = [n for n in self._unit_modules(name, unit) if self.scheme_of(n) is not None]
                n_modules += len(mods)
                out.append(f"{index:4d} {chain.tower:9s} {name}: {_summarise(name, mods, self.scheme_of)}")
        out.append(f"{n_modules} modules in {index} blocks")
        return out

    def _unit_modules(self, unit_name: str, unit: torch.nn.Module) -> list[str]:
        subs = [f"{unit_name}.{s}" for s, m in unit.named_modules() if isinstance(m, torch.nn.Linear)]
        return subs + [n for n in self.experts if n.startswith(unit_name + ".")]


def _summarise(unit_name: str, modules: list[str], scheme_of: Callable[[str], ModuleScheme | None]) -> str:
    """`attn.qkv, mlp.fc1 [W4A8 g32]; experts 0-7 x (gate, up, down) [W4 g32 shared 8]`."""
    if not modules:
        return "(nothing to quantize)"
    by_scheme: dict[str, list[str]] = {}
    experts: dict[tuple[str, str], set[int]] = {}
    for n in modules:
        parsed = parse_expert_name(n)
        s = scheme_of(n)
        key = (f"W{s.weight.bits}{f'A{s.activation.bits}' if s.activation else ''} g{s.weight.group_size}"
               + (f" shared {s.adapters.shared_rank}" if s.adapters.shared_rank else "")
               + (f" routed {s.adapters.num_routed}x{s.adapters.routed_rank}" if s.adapters.num_routed else ""))
        if parsed is None:
            by_scheme.setdefault(key, []).append(n[len(unit_name) + 1:])
        else:
            path, e, _ = parsed
            experts.setdefault((path[len(unit_name) + 1:], key), set()).add(e)
    parts = [f"{', '.join(subs)} [{key}]" for key, subs in by_scheme.items()]
    parts += [f"{path}.{{{min(es)}..{max(es)}}}.{{gate,up,down}}_proj [{key}]" for (path, key), es in experts.items()]
    return "; ".join(parts)


def kind_pattern(disk_name: str) -> str:
    """`re:` pattern of every module of `disk_name`'s kind: its block indices (`.<n>.`) replaced by `\\d+`."""
    return "re:" + re.sub(r"\\\.\d+(?=\\\.|$)", r"\\.\\d+", re.escape(disk_name))


def scheme_override(s: ModuleScheme) -> dict[str, Any]:
    """A complete override (every field) that gives a module scheme `s`."""
    return {"weight": asdict(s.weight), "activation": None if s.activation is None else asdict(s.activation),
            "adapters": asdict(s.adapters), "smooth": s.smooth}


def stored_overrides(stored: dict[str, ModuleScheme], differ: set[str]) -> dict[str, dict[str, Any]]:
    """Overrides giving each checkpoint module in `differ` its scheme in `stored` (checkpoint name -> scheme of
    every quantized module), to be placed before the planned ones: one `re:` entry per layer kind where every
    quantized module of that kind has the same scheme, exact names elsewhere."""
    out: dict[str, dict[str, Any]] = {}
    by_kind: dict[str, list[str]] = {}
    for m in sorted(differ):
        by_kind.setdefault(kind_pattern(m), []).append(m)
    for key, members in by_kind.items():
        rx = re.compile(key[3:])
        kind = [m for m in stored if rx.fullmatch(m)]
        if set(kind) == set(members) and len({stored[m] for m in kind}) == 1:
            out[key] = scheme_override(stored[members[0]])
        else:
            out.update({m: scheme_override(stored[m]) for m in members})
    return out


def _adapter_overrides(model: torch.nn.Module, plan: CalibrationPlan) -> dict[str, dict[str, Any]]:
    """Per-group adapter ranks where the algorithm's depend on the layer shape (QE under a bits-per-weight budget).

    A group is the dense linear layers of one parent module with the same input size (q/k/v/o, gate/up: what
    vLLM fuses must share one scheme); its ranks come from `algorithm.adapters_for(in, [out, ...])`. Overrides are
    written per layer kind (`re:` with the block index as `\\d+`) and per module only where blocks of one kind
    differ."""
    groups: dict[tuple[str, int], list[str]] = {}
    for n in sorted(plan.in_chains):
        if parse_expert_name(plan.disk[n]) is None and plan.scheme_of(n) is not None:
            groups.setdefault((n.rpartition(".")[0], model.get_submodule(n).weight.shape[1]), []).append(n)
    by_key: dict[str, list[tuple[list[str], dict[str, int]]]] = {}
    for (_, in_f), members in groups.items():
        ranks = plan.algorithm.adapters_for(in_f, [model.get_submodule(n).weight.shape[0] for n in members])
        if ranks == plan.qconfig.adapters:
            continue
        disk_parent = plan.disk[members[0]].rpartition(".")[0]
        leaves = "|".join(sorted(re.escape(plan.disk[n].rpartition(".")[2]) for n in members))
        key = kind_pattern(disk_parent) + rf"\.({leaves})"
        by_key.setdefault(key, []).append(([plan.disk[n] for n in members], asdict(ranks)))
    out: dict[str, dict[str, Any]] = {}
    for key, entries in by_key.items():
        if all(r == entries[0][1] for _, r in entries):
            out[key] = {"adapters": entries[0][1]}
        else:
            out.update({name: {"adapters": r} for names, r in entries for name in names})
    return out


def build_plan(model: torch.nn.Module, config: CalibrationConfig, algorithm: Algorithm, tensor_names: set[str],
               locate: Locate | None = None, model_dir: str | Path = "") -> CalibrationPlan:
    """The plan for `model` (loaded, or a `meta` skeleton) whose folder holds `tensor_names`. `locate`: the
    offloaded model's own map of parameters to checkpoint tensors (a meta skeleton has no record of
    transformers' load-time renames)."""
    act = None if config.abits is None else ActivationScheme(bits=config.abits)
    qcfg = QEConfig(weight=WeightScheme(config.wbits, config.group_size, config.symmetric), activation=act,
                    adapters=algorithm.adapters, smooth=algorithm.uses_smoothing(act is not None),
                    algorithm={"name": config.method, "params": config.method_params})
    experts_disk = expert_checkpoint_names(model)
    if experts_disk:
        qcfg.overrides[EXPERT_OVERRIDE] = _expert_override(algorithm, act)
        if qcfg.module_scheme("x.experts.0.gate_proj") == qcfg.module_scheme("x"):
            del qcfg.overrides[EXPERT_OVERRIDE]  # the experts' scheme is the default one: no override needed
    qcfg.validate()

    chains = [c for c in get_chains(model, model.config.model_type)
              if (c.tower == "language" and config.quantize_language)
              or (c.tower != "language" and config.quantize_vision)]
    all_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    disk = {**checkpoint_names(model, all_linears), **experts_disk}
    if locate is not None:
        for n in all_linears:
            with contextlib.suppress(KeyError):  # tied weights (lm_head) are not in the files
                disk[n] = locate(f"{n}.weight", tuple(model.get_submodule(n).weight.shape))[0][:-7]
    unit_names = [name for c in chains for name, _ in c.units]
    in_chains = {f"{name}.{sub}" for c in chains for name, unit in c.units
                 for sub, m in unit.named_modules() if isinstance(m, torch.nn.Linear)}
    in_chains |= {n for n in experts_disk if any(n.startswith(u + ".") for u in unit_names)}
    for n in sorted(in_chains):
        tensor = source_tensor(disk[n])
        if tensor not in tensor_names:
            raise ValueError(f"{model_dir}: module {n} maps to {tensor}, which is not in the safetensors")
    plan = CalibrationPlan(config, algorithm, qcfg, chains, disk, in_chains, all_linears, experts_disk)
    qcfg.overrides.update(_adapter_overrides(model, plan))
    qcfg.validate()
    if not algorithm.supports_moe:
        moe = [n for n in sorted(in_chains) if parse_expert_name(n) and plan.scheme_of(n) is not None]
        if moe:
            raise ValueError(f"method {algorithm.name!r} does not support MoE experts ({moe[0]}, ...): leave them "
                             "unquantized (--ignore 're:.*\\.experts\\..*') or pick another method")
    return plan
