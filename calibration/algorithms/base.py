"""The algorithm contract: statistics in, quantized weights (+ adapters, router) out.

An algorithm is a class registered by name (`@register`) with
- a typed `Config` dataclass: `--method-params` is parsed into it by `parse_params` (an unknown or mistyped key is
  an error naming the algorithm and its allowed keys), available as `self.config`;
- declared attributes the pipeline reads (and nothing else): `needs_gradients` (run the gradient pass first: TLQ
  ratios, VEQ's γ), `supports_moe` (fused MoE experts become per-expert targets), `shared_expert_scale` (all of
  an MoE block's experts' gate/up form one input group), `adapters` / `expert_adapters` (the low-rank experts it
  produces, an `AdapterScheme`), `uses_smoothing(act_quantized)` (its checkpoint carries `smooth_scale`). These
  are the plan's bounds: a module may store less (no smoothing vector, lower adapter ranks) and the writer then
  declares what it stores (`spec.stored_scheme`); MoE experts must store their declared scheme;
- `stats_request(scheme)`: what the layer loop streams per input (Gram matrix, token reservoir, QE's top-k
  channel counts, VEQ's router affinity);
- `quantize_group(targets)`: one *input group* (linear layers of a block that read the same tensor, e.g. q/k/v or
  gate/up, so smoothing factors can be shared) -> `{name: QuantizedLinear}`.
Smoothing-then-quantization and `base=` composition live in `compose.py`, written once.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from vllm_qe.calibration.stats import InputStats
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.quantizer import CLIPS, DEFAULT_CLIP
from vllm_qe.format.spec import AdapterScheme, ModuleScheme


@dataclass
class StatsRequest:
    """What the layer loop must stream per linear layer: Gram matrix and/or a reservoir of token rows."""

    gram: bool = False
    max_tokens: int = 0
    topk: int = 0  # QE: count each token's `topk` most important channels (|x| * mean_row |W|)
    affinity: bool = False  # VEQ-MA: weight MoE experts' tokens by router probability x modality factor


@dataclass
class LinearTarget:
    """One linear layer to quantize: `weight` float32 `[out, in]`, its input statistics and its scheme."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    stats: InputStats | None
    scheme: ModuleScheme


@dataclass(frozen=True)
class NoParams:
    """The config of an algorithm without parameters."""


class Algorithm:
    """Base class of every algorithm: set `name` (and `Config`), implement `quantize_group`; override the
    declared attributes that differ from these defaults."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoParams
    needs_gradients: bool = False
    supports_moe: bool = True
    shared_expert_scale: bool = False

    def __init__(self, config: Any = None, *, clip: str = DEFAULT_CLIP) -> None:
        """`config`: the algorithm's typed `Config`; `clip`: how every weight quantizer of this algorithm picks
        group ranges (`minmax` | `mse`, `quantizer.choose_qparams`; the `vllm-qe calibrate --clip` flag)."""
        if clip not in CLIPS:
            raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")
        self.clip = clip
        self.config = self.Config() if config is None else config
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name}: config must be a {self.Config.__name__}, got {type(self.config).__name__}")

    @property
    def adapters(self) -> AdapterScheme:
        """The low-rank adapters of the linear layers this algorithm writes (none by default)."""
        return AdapterScheme()

    def adapters_for(self, in_features: int, out_features: list[int], smoothed: bool | None = None) -> AdapterScheme:
        """The adapters of a group of layers reading one input of `in_features` with `out_features` outputs each
        (layers vLLM fuses into one GEMM must share them), `smoothed`: whether the group stores smoothing vectors
        (None: as `uses_smoothing` declares); default: `adapters` whatever the shape."""
        return self.adapters

    @property
    def expert_adapters(self) -> AdapterScheme:
        """The adapters of MoE expert modules (format v1: shared ones only; default: those of linear layers)."""
        return self.adapters

    def uses_smoothing(self, act_quantized: bool) -> bool:
        """Whether this algorithm's checkpoint carries `smooth_scale` (may depend on activation quantization)."""
        return False

    def stats_request(self, scheme: ModuleScheme) -> StatsRequest:
        """The statistics streamed per input; the default (none beyond |x| and a small token sample) suits
        data-free methods."""
        return StatsRequest()

    def quantize_group(self, targets: list[LinearTarget]) -> dict[str, QuantizedLinear]:
        raise NotImplementedError

    @classmethod
    def parse_params(cls, params: dict[str, Any] | None) -> Any:
        """`Config` from a JSON object (`--method-params`); unknown keys and values of the wrong type are errors
        naming the algorithm and its parameters."""
        return parse_config(cls.name, cls.Config, params or {})


def describe_config(config_cls: type) -> str:
    """`k: int = 32, base: 'rtn' | 'gptq' = 'rtn', ...` (the allowed keys of a config dataclass)."""
    hints = typing.get_type_hints(config_cls)
    parts = [f"{f.name}: {_type_name(hints[f.name])} = {f.default!r}" for f in dataclasses.fields(config_cls)]
    return ", ".join(parts) if parts else "(none)"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(algo: str, key: str, value: Any, tp: Any, allowed: str) -> Any:
    """`value` as type `tp` (int is accepted for float); anything else is an error."""
    bad = ValueError(f"method {algo!r}: parameter {key!r} must be {_type_name(tp)}, got {value!r} "
                     f"(parameters: {allowed})")
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"{algo}: config field {key!r} has unsupported type {tp!r}")


def parse_config(algo: str, config_cls: type, params: dict[str, Any]) -> Any:
    if not isinstance(params, dict):
        raise ValueError(f"method {algo!r}: parameters must be a JSON object, got {params!r}")
    allowed = describe_config(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"method {algo!r}: unknown parameter{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; allowed: {allowed}")
    hints = typing.get_type_hints(config_cls)
    return config_cls(**{k: _coerce(algo, k, v, hints[k], allowed) for k, v in params.items()})


REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make `cls` available by `cls.name` (`--method`)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: an algorithm needs a `name`")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass")
    REGISTRY[cls.name] = cls
    return cls


def get_algorithm(name: str, *, clip: str = DEFAULT_CLIP, **params: Any) -> Algorithm:
    """The algorithm `name` configured from `params` (validated against its `Config`); `clip`: its weight
    quantizers' range choice (`Algorithm.__init__`)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    return cls(cls.parse_params(params), clip=clip)
