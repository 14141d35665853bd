"""Checkpoint format v1: the `quantization_config` schema and the tensors each quantized module carries.

See docs/checkpoint-format.md. This module is the single source of truth for names, dtypes and shapes; the
calibration writer, the checkpoint validator and the vLLM runtime all derive from it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from vllm_qe.format.packing import packed_width
from vllm_qe.format.quantizer import SUPPORTED_ACT_BITS, SUPPORTED_WEIGHT_BITS, num_groups

QUANT_METHOD = "quant_experts"
FORMAT_VERSION = 1


# MoE experts are written per expert as linear modules `<experts>.<e>.{gate,up,down}_proj` (the per-expert naming
# of compressed-tensors and of vLLM's expert weight loader); this override key gives them their own scheme.
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
EXPERT_OVERRIDE = r"re:.*\.experts\.\d+\.(gate_proj|up_proj|down_proj)"
_EXPERT_NAME = re.compile(r"(?P<path>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)")


def parse_expert_name(name: str) -> tuple[str, int, str] | None:
    """`(experts path, expert index, projection)` of a per-expert module name, else None."""
    m = _EXPERT_NAME.fullmatch(name)
    return None if m is None else (m["path"], int(m["e"]), m["proj"])


class FormatError(ValueError):
    """A checkpoint or config does not follow the format; the message names the field/module/tensor."""


class InvalidCheckpoint(RuntimeError):
    """A `FormatError` re-raised where a caller would wrap a ValueError in its own report (vLLM builds its config
    in a pydantic dataclass, which turns ValueErrors into a multi-line ValidationError): same one-line message."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_bool(v: Any, where: str) -> None:
    if not isinstance(v, bool):
        raise FormatError(f"{where}: must be true or false, got {v!r}")


@dataclass(frozen=True)
class WeightScheme:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def validate(self, where: str) -> None:
        if not _is_int(self.bits) or self.bits not in SUPPORTED_WEIGHT_BITS:
            raise FormatError(f"{where}.bits: must be one of {SUPPORTED_WEIGHT_BITS}, got {self.bits!r}")
        if not _is_int(self.group_size) or (self.group_size != -1 and self.group_size <= 0):
            raise FormatError(f"{where}.group_size: must be a positive integer or -1, got {self.group_size!r}")
        _check_bool(self.symmetric, f"{where}.symmetric")


@dataclass(frozen=True)
class ActivationScheme:
    bits: int = 8
    scheme: str = "per_token_dynamic"
    symmetric: bool = True

    def validate(self, where: str) -> None:
        if not _is_int(self.bits) or self.bits not in SUPPORTED_ACT_BITS:
            raise FormatError(f"{where}.bits: must be one of {SUPPORTED_ACT_BITS}, got {self.bits!r}")
        _check_bool(self.symmetric, f"{where}.symmetric")
        if self.scheme != "per_token_dynamic" or not self.symmetric:
            raise FormatError(f"{where}: only symmetric per_token_dynamic activation quantization is supported")


@dataclass(frozen=True)
class AdapterScheme:
    shared_rank: int = 0
    num_routed: int = 0
    routed_rank: int = 0
    top_k: int = 1

    def validate(self, where: str) -> None:
        for name in ("shared_rank", "num_routed", "routed_rank"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise FormatError(f"{where}.{name}: must be a non-negative integer, got {v!r}")
        if (self.num_routed > 0) != (self.routed_rank > 0):
            raise FormatError(f"{where}: num_routed and routed_rank must both be zero or both positive")
        if not _is_int(self.top_k) or self.top_k != 1:
            raise FormatError(f"{where}.top_k: only hard top-1 routing is defined in format v1, got {self.top_k!r}")


@dataclass(frozen=True)
class ModuleScheme:
    """Everything that fixes the tensors of one quantized module."""

    weight: WeightScheme
    activation: ActivationScheme | None
    adapters: AdapterScheme
    smooth: bool = False


@dataclass
class QEConfig:
    """The `quantization_config` of a vllm-qe checkpoint."""

    weight: WeightScheme = field(default_factory=WeightScheme)
    activation: ActivationScheme | None = None
    adapters: AdapterScheme = field(default_factory=AdapterScheme)
    smooth: bool = False
    algorithm: dict[str, Any] = field(default_factory=lambda: {"name": "rtn", "params": {}})
    ignore: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantized_modules: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    # informational: stored bits per weight (vllm_qe/format/storage.py); written by the writer, checked on read
    storage: dict[str, Any] | None = None

    # -- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "weight": asdict(self.weight),
            "activation": None if self.activation is None else asdict(self.activation),
            "adapters": asdict(self.adapters),
            "smooth": self.smooth,
            "algorithm": copy.deepcopy(self.algorithm),
            "ignore": list(self.ignore),
            "overrides": copy.deepcopy(self.overrides),
            "quantized_modules": list(self.quantized_modules),
        }
        if self.storage is not None:
            d["storage"] = copy.deepcopy(self.storage)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QEConfig:
        """Parse and validate; every error names the offending field."""
        where = "quantization_config"
        if not isinstance(d, dict):
            raise FormatError(f"{where}: expected an object, got {type(d).__name__}")
        if d.get("quant_method") != QUANT_METHOD:
            raise FormatError(f"{where}.quant_method: expected {QUANT_METHOD!r}, got {d.get('quant_method')!r}")
        version = d.get("format_version")
        if not _is_int(version) or version != FORMAT_VERSION:
            raise FormatError(
                f"{where}.format_version: unsupported format_version {version!r} "
                f"(this vllm-qe reads {FORMAT_VERSION})"
            )
        required = ["weight", "activation", "adapters", "smooth", "algorithm", "ignore", "overrides",
                    "quantized_modules"]
        unknown = sorted(set(d) - set(required) - {"quant_method", "format_version", "storage"})
        if unknown:
            raise FormatError(f"{where}: unknown field(s) {unknown}")
        missing = [k for k in required if k not in d]
        if missing:
            raise FormatError(f"{where}.{missing[0]}: missing (every field is written; `activation` is null for "
                              "weight-only)")
        _check_bool(d["smooth"], f"{where}.smooth")
        if not isinstance(d["algorithm"], dict) or not isinstance(d["algorithm"].get("name"), str):
            raise FormatError(f"{where}.algorithm: expected an object with a string `name`, got {d['algorithm']!r}")
        if not isinstance(d["algorithm"].get("params", {}), dict):
            raise FormatError(f"{where}.algorithm.params: expected an object, got {d['algorithm']['params']!r}")
        for key in ("ignore", "quantized_modules"):
            if not isinstance(d[key], list) or not all(isinstance(v, str) for v in d[key]):
                raise FormatError(f"{where}.{key}: expected a list of module names, got {str(d[key])[:80]}")
        if not isinstance(d["overrides"], dict) or not all(isinstance(v, dict) for v in d["overrides"].values()):
            raise FormatError(f"{where}.overrides: expected an object of module name -> object")
        if d.get("storage") is not None and not isinstance(d["storage"], dict):
            raise FormatError(f"{where}.storage: expected an object, got {d['storage']!r}")
        cfg = cls(
            weight=_parse(WeightScheme, d["weight"], f"{where}.weight", complete=True),
            activation=None if d["activation"] is None
            else _parse(ActivationScheme, d["activation"], f"{where}.activation", complete=True),
            adapters=_parse(AdapterScheme, d["adapters"], f"{where}.adapters", complete=True),
            smooth=d["smooth"],
            algorithm=dict(d["algorithm"]),
            ignore=list(d["ignore"]),
            overrides=copy.deepcopy(d["overrides"]),
            quantized_modules=list(d["quantized_modules"]),
            storage=copy.deepcopy(d.get("storage")),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        where = "quantization_config"
        self.weight.validate(f"{where}.weight")
        if self.activation is not None:
            self.activation.validate(f"{where}.activation")
        self.adapters.validate(f"{where}.adapters")
        for name, ov in self.overrides.items():
            if name.startswith("re:"):
                try:
                    re.compile(name[3:])
                except re.error as e:
                    raise FormatError(f"{where}.overrides[{name!r}]: invalid regular expression ({e})") from e
            at = f"{where}.overrides[{name!r}]"
            if not isinstance(ov, dict):
                raise FormatError(f"{at}: expected an object, got {ov!r}")
            bad = sorted(set(ov) - {"weight", "activation", "adapters", "smooth"})
            if bad:
                raise FormatError(f"{at}: unknown field(s) {bad}")
            for key, kind in (("weight", WeightScheme), ("adapters", AdapterScheme)):
                if key in ov:
                    _parse(kind, ov[key], f"{at}.{key}", build=False)
            if ov.get("activation") is not None:
                _parse(ActivationScheme, ov["activation"], f"{at}.activation", build=False)
            if "smooth" in ov:
                _check_bool(ov["smooth"], f"{at}.smooth")
            sch = self.module_scheme(name)
            sch.weight.validate(f"{at}.weight")
            sch.adapters.validate(f"{at}.adapters")
            if sch.activation is not None:
                sch.activation.validate(f"{at}.activation")

    # -- per-module view ---------------------------------------------------------------------------------------
    def is_ignored(self, name: str) -> bool:
        """True when `name` matches the ignore list (exact name, or `re:` regular expression)."""
        return matches_any(name, self.ignore)

    def override_key(self, name: str) -> str | None:
        """The `overrides` key that applies to module `name`: its exact entry, else the first `re:` entry that
        fully matches it (None: no override)."""
        if name in self.overrides:
            return name
        return next((k for k in self.overrides if k.startswith("re:") and re.fullmatch(k[3:], name)), None)

    def override_of(self, name: str) -> dict[str, Any]:
        """The override of module `name` (`override_key`), `{}` if none."""
        key = self.override_key(name)
        return {} if key is None else self.overrides[key]

    def module_scheme(self, name: str) -> ModuleScheme:
        """The scheme of module `name` after applying its override, if any."""
        ov = self.override_of(name)
        weight = replace(self.weight, **ov["weight"]) if "weight" in ov else self.weight
        if "activation" in ov:
            act = None if ov["activation"] is None else _parse(
                ActivationScheme, {**asdict(self.activation or ActivationScheme()), **ov["activation"]},
                f"quantization_config.overrides[{name!r}].activation")
        else:
            act = self.activation
        adapters = replace(self.adapters, **ov["adapters"]) if "adapters" in ov else self.adapters
        return ModuleScheme(weight, act, adapters, bool(ov.get("smooth", self.smooth)))


def matches_any(name: str, patterns: list[str]) -> bool:
    """`name` equals one of `patterns`, or fully matches one written `re:REGEX`."""
    return any(re.fullmatch(p[3:], name) if p.startswith("re:") else name == p for p in patterns)


def _parse(kind: type, d: Any, where: str, complete: bool = False, build: bool = True) -> Any:
    """Build a scheme dataclass from a JSON object: unknown fields are errors, and with `complete` so are missing
    ones; `build=False` only checks the field names (a partial override)."""
    if not isinstance(d, dict):
        raise FormatError(f"{where}: expected an object, got {type(d).__name__}")
    fields = kind.__dataclass_fields__
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise FormatError(f"{where}: unknown field(s) {unknown}")
    missing = [f for f in fields if f not in d]
    if complete and missing:
        raise FormatError(f"{where}.{missing[0]}: missing")
    if not build:
        return None
    obj = kind(**d)
    obj.validate(where)
    return obj


# Tensor suffixes of a quantized module, in a stable order.
WEIGHT_PACKED = "weight_packed"
WEIGHT_SCALE = "weight_scale"
WEIGHT_ZERO = "weight_zero_point"
WEIGHT_SHAPE = "weight_shape"
SMOOTH_SCALE = "smooth_scale"
SHARED_A = "shared_a"
SHARED_B = "shared_b"
ROUTED_A = "routed_a"
ROUTED_B = "routed_b"
ROUTER = "router"
ALL_SUFFIXES = (WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_ZERO, WEIGHT_SHAPE, SMOOTH_SCALE, SHARED_A, SHARED_B,
                ROUTED_A, ROUTED_B, ROUTER)


# Adapters and routers are stored as float16 (half the bytes of float32; the runtime computes them in the model's
# dtype). Checkpoints written before this stored float32, which readers still accept (LEGACY_ADAPTER_DTYPE).
ADAPTER_DTYPE = torch.float16
LEGACY_ADAPTER_DTYPE = torch.float32
ADAPTER_SUFFIXES = (SHARED_A, SHARED_B, ROUTED_A, ROUTED_B, ROUTER)


def stored_scheme(declared: ModuleScheme, shapes: dict[str, tuple[int, ...]]) -> ModuleScheme:
    """The scheme a module's stored tensors realise (`shapes`: suffix -> shape): `declared`'s weight and
    activation, with smoothing and adapter ranks read from the tensors present. An algorithm may store less than
    its plan declared (a group that chose an unsmoothed base, adapters trimmed to the ranks that help); the writer
    declares what is stored (`CalibrationPlan.final_qconfig`)."""
    routed = shapes.get(ROUTED_A)
    adapters = AdapterScheme(shared_rank=int(shapes[SHARED_A][0]) if SHARED_A in shapes else 0,
                             num_routed=int(routed[0]) if routed else 0, routed_rank=int(routed[1]) if routed else 0,
                             top_k=declared.adapters.top_k)
    return replace(declared, adapters=adapters, smooth=SMOOTH_SCALE in shapes)


def expected_tensors(
    scheme: ModuleScheme, out_features: int, in_features: int
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Suffix -> (dtype, shape) of every tensor a module of this scheme and size must carry."""
    w = scheme.weight
    g = num_groups(in_features, w.group_size)
    spec: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        WEIGHT_PACKED: (torch.int32, (out_features, packed_width(in_features, w.bits))),
        WEIGHT_SCALE: (torch.float16, (out_features, g)),
        WEIGHT_SHAPE: (torch.int64, (2,)),
    }
    if not w.symmetric:
        spec[WEIGHT_ZERO] = (torch.uint8, (out_features, g))
    if scheme.smooth:
        spec[SMOOTH_SCALE] = (torch.float32, (in_features,))
    a = scheme.adapters
    if a.shared_rank:
        spec[SHARED_A] = (ADAPTER_DTYPE, (a.shared_rank, in_features))
        spec[SHARED_B] = (ADAPTER_DTYPE, (out_features, a.shared_rank))
    if a.num_routed:
        spec[ROUTED_A] = (ADAPTER_DTYPE, (a.num_routed, a.routed_rank, in_features))
        spec[ROUTED_B] = (ADAPTER_DTYPE, (a.num_routed, out_features, a.routed_rank))
        spec[ROUTER] = (ADAPTER_DTYPE, (a.num_routed, in_features))
    return spec
