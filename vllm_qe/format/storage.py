"""Bytes as stored: bits per weight of every quantized module, counted from the dtypes and shapes on disk.

A quantized module's stored bits are those of every tensor it carries — packed weights, scales, zero points,
smoothing vector, shared and routed adapters, router — except `bias` (the full-precision model has it too) and
`weight_shape` (16 bytes of metadata); its bits per weight (bpw) divide them by `out * in`. The checkpoint records
the result in `quantization_config.storage` (informational; the validator checks it against the files).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from vllm_qe.format import spec
from vllm_qe.format.spec import QEConfig

NOT_COUNTED = ("bias", spec.WEIGHT_SHAPE)
FP16_BYTES = 2
_INDEX = re.compile(r"\.\d+(?=\.|$)")


class _Sized(Protocol):
    dtype: Any

    def numel(self) -> int: ...

    def element_size(self) -> int: ...


def nbytes(t: _Sized) -> int:
    return t.numel() * t.element_size()


def layer_kind(module: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `model.layers.*.self_attn.q_proj` (layer and expert indices starred)."""
    return _INDEX.sub(".*", module)


def _record_key(module: str) -> str:
    """Name under `storage.per_module`: the module, or for a per-expert module its MoE layer's projection
    (`...experts.*.gate_proj`: one entry per MoE layer and projection, not per expert)."""
    parsed = spec.parse_expert_name(module)
    return module if parsed is None else f"{parsed[0]}.*.{parsed[2]}"


@dataclass
class Storage:
    """Stored bits of the quantized modules and sizes of the whole checkpoint."""

    modules: dict[str, tuple[int, int]] = field(default_factory=dict)  # module -> (weights out*in, stored bits)
    total_bytes: int = 0  # every tensor of the checkpoint as stored
    fp16_bytes: int = 0  # the same model with every quantized weight and every floating tensor at 16 bits

    @staticmethod
    def _bpw(items) -> float:
        w = sum(n for n, _ in items)
        return sum(b for _, b in items) / w if w else 0.0

    def bits_per_weight(self) -> float:
        """Over all quantized modules: stored bits / weights."""
        return self._bpw(self.modules.values())

    def grouped(self, key) -> dict[str, tuple[int, int, float]]:
        """`key(module)` -> (modules, weights, bpw), in first-seen order."""
        out: dict[str, list[tuple[int, int]]] = {}
        for m, v in self.modules.items():
            out.setdefault(key(m), []).append(v)
        return {k: (len(v), sum(n for n, _ in v), self._bpw(v)) for k, v in out.items()}

    def config_block(self) -> dict[str, Any]:
        """The `quantization_config.storage` record: the quantized modules only (rounded so that it survives JSON
        unchanged); the whole checkpoint's size is not recorded (a norm stored in another float dtype is legal)."""
        return {
            "bits_per_weight": round(self.bits_per_weight(), 4),
            "quantized_weights": sum(n for n, _ in self.modules.values()),
            "quantized_bytes": sum(b for _, b in self.modules.values()) // 8,
            "per_module": {k: round(v[2], 4) for k, v in self.grouped(_record_key).items()},
        }

    def lines(self) -> list[str]:
        """What `vllm-qe inspect` prints about bytes."""
        kinds = self.grouped(layer_kind)
        out = [f"bits per weight {self.bits_per_weight():.3f} over {len(self.modules)} quantized modules "
               f"(packed weights, scales, zero points, smoothing, adapters, router; as stored)"]
        width = max((len(k) for k in kinds), default=0)
        out += [f"  {k:<{width}}  {bpw:7.3f} bpw  ({n} module{'s' if n > 1 else ''})" for k, (n, _, bpw) in
                kinds.items()]
        ratio = self.total_bytes / self.fp16_bytes if self.fp16_bytes else float("nan")
        out.append(f"checkpoint size {self.total_bytes / 2**20:.2f} MiB vs {self.fp16_bytes / 2**20:.2f} MiB at FP16 "
                   f"({ratio:.1%})")
        if self.total_bytes > self.fp16_bytes:
            out.append("WARNING         this checkpoint is larger than its FP16 source")
        return out


def count_storage(qcfg: QEConfig, tensors: dict[str, _Sized], grouped: dict[str, dict[str, str]],
                  shapes: dict[str, tuple[int, int]]) -> Storage:
    """Count the stored bits of every quantized module (`grouped`: module -> {suffix: tensor name}, `shapes`:
    module -> (out, in)) and the checkpoint's size vs FP16."""
    st = Storage()
    in_module: set[str] = set()  # tensors that stand for a quantized weight (all but bias)
    for mod in qcfg.quantized_modules:
        out_f, in_f = shapes[mod]
        bits = 0
        for suffix, name in grouped[mod].items():
            if suffix == "bias":
                continue
            in_module.add(name)
            if suffix not in NOT_COUNTED:
                bits += 8 * nbytes(tensors[name])
        st.modules[mod] = (out_f * in_f, bits)
        st.fp16_bytes += out_f * in_f * FP16_BYTES
    for name, t in tensors.items():
        st.total_bytes += nbytes(t)
        if name not in in_module:
            st.fp16_bytes += t.numel() * FP16_BYTES if t.dtype.is_floating_point else nbytes(t)
    return st
