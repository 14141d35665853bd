"""Weight streaming for calibration at scale: the model's blocks stay on the `meta` device and one block at a time
is materialised from the model folder's safetensors (`--offload`), so peak memory is one block plus the resident
parts (embeddings, norms, head) and the calibration activations, whatever the number of layers.

- `load_skeleton(model_dir)`: the transformers model built on `meta`, its resident tensors read from safetensors
  and its non-persistent buffers (rotary tables) taken from a one-layer real instance of the same config.
- `WeightStreamer`: per unit (block), the map of its parameters to checkpoint tensors; `materialize(name)` /
  `release(name)`; forward hooks that materialise a block for the duration of one forward (the capture and
  gradient passes run through all blocks this way). A block that is already calibrated is materialised in its
  quantized form from the calibration state (`ResumeStore.unit_quantized`).
The map from a parameter to its checkpoint tensor uses transformers' own name conversion; fused MoE experts that
transformers stores transposed are recognised by shape (an ambiguous square expert shape is an error).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_qe.format.module import QuantizedLinear


def _tensor_index(model_dir: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (headers only)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                index[k] = f
    return index


READ_CHUNK = 64 << 20  # bytes per slice when reading a large tensor
_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(shape: list[int], dtype: str) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * _DTYPE_BYTES.get(dtype, 4)


def _header_shape(path: Path, name: str) -> tuple[int, ...]:
    with safe_open(str(path), framework="pt") as sf:
        return tuple(sf.get_slice(name).get_shape())


class TensorSource:
    """Reads single tensors of a model folder (safetensors only) under their in-memory parameter names."""

    def __init__(self, model: torch.nn.Module, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.dir = Path(model_dir)
        self.index = _tensor_index(self.dir)
        self.dtype = dtype

    def locate(self, full_name: str, shape: tuple[int, ...]) -> tuple[str, bool]:
        """(checkpoint name, transpose) of the in-memory parameter `full_name` of `shape`."""
        from transformers.core_model_loading import revert_weight_conversion

        keys = list(revert_weight_conversion(self.model, {full_name: torch.empty(shape, device="meta")}).keys())
        disk = keys[0] if len(keys) == 1 else None
        if disk is not None and disk not in self.index:
            # transformers' reverse renaming is not always the inverse of its loading (LLaVA's CLIP tower is
            # read from `vision_tower.vision_model.*`): accept the one tensor that ends like the mapped name.
            tail = "." + disk.split(".", 1)[-1]
            found = [k for k in self.index if k.endswith(tail)]
            disk = found[0] if len(found) == 1 else None
        if disk is None:
            raise KeyError(f"{self.dir}: no checkpoint tensor for parameter {full_name} (mapped to {keys})")
        got = _header_shape(self.index[disk], disk)
        if got == tuple(shape):
            return disk, False
        swapped = (*shape[:-2], shape[-1], shape[-2]) if len(shape) >= 2 else None
        if got == swapped:
            return disk, True
        raise ValueError(f"{self.dir}: tensor {disk} has shape {list(got)}, parameter {full_name} needs {list(shape)}")

    def read(self, disk: str, transpose: bool) -> torch.Tensor:
        """The tensor in `self.dtype`, read in slices of about `READ_CHUNK` bytes along dim 0 (the file is reopened
        per slice, so neither a full-size copy in the file's dtype nor the whole mapped file stays resident:
        a 151936 x 1536 bfloat16 embedding costs its float32 result plus one slice)."""
        path = str(self.index[disk])
        with safe_open(path, framework="pt") as sf:
            sl = sf.get_slice(disk)
            shape, dtype = list(sl.get_shape()), sl.get_dtype()
            if not shape or _nbytes(shape, dtype) <= READ_CHUNK:
                t = sf.get_tensor(disk)
                return (t.transpose(-1, -2) if transpose else t).to(self.dtype).contiguous()
        out_shape = shape[:-2] + [shape[-1], shape[-2]] if transpose else shape
        out = torch.empty(out_shape, dtype=self.dtype)
        step = max(1, READ_CHUNK // max(_nbytes(shape[1:], dtype), 1))
        for r0 in range(0, shape[0], step):
            with safe_open(path, framework="pt") as sf:
                part = sf.get_slice(disk)[r0:r0 + step]
            if transpose and len(shape) == 2:
                out[:, r0:r0 + step] = part.t()
            else:
                out[r0:r0 + step] = part.transpose(-1, -2) if transpose else part
        return out


def _set_param(root: torch.nn.Module, path: str, value: torch.Tensor) -> None:
    parent, _, attr = path.rpartition(".")
    mod = root.get_submodule(parent) if parent else root
    if attr in mod._parameters:
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def bound_allocator(threshold: int = 1 << 20) -> bool:
    """Serve allocations >= `threshold` bytes with mmap (glibc `mallopt(M_MMAP_THRESHOLD)`), so that the blocks and
    activations freed one block at a time go back to the system. Without it glibc raises its threshold dynamically
    after large frees and the heap fragments: measured on the 2B config, peak RSS then crept ~60 MiB per block
    (docs/benchmarks/calibration-memory.md). Returns False where there is no glibc (the bound then loosens)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def load_skeleton(model_dir: str | Path, unit_paths: Callable[[torch.nn.Module], list[str]],
                  dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, TensorSource]:
    """The model on `meta` with everything outside the blocks named by `unit_paths(model)` loaded."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    bound_allocator()
    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.eval()
    source = TensorSource(model, model_dir, dtype)
    units = tuple(p + "." for p in unit_paths(model))
    for name, p in model.named_parameters():
        if not name.startswith(units):
            _set_param(model, name, source.read(*source.locate(name, tuple(p.shape))))
    _fill_buffers(model, config, dtype)
    model.tie_weights()
    return model, source


def _fill_buffers(model: torch.nn.Module, config, dtype: torch.dtype) -> None:
    """Non-persistent buffers (not in the checkpoint) from a real instance of the config with one layer per tower
    and tiny vocabulary / MLP widths (so it costs little memory; rotary tables depend on head sizes only): same
    names, layer indices mapped to 0."""
    import copy

    from transformers import AutoModelForImageTextToText

    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if not meta:
        return
    small_cfg = copy.deepcopy(config)
    for sub in (small_cfg, getattr(small_cfg, "text_config", None), getattr(small_cfg, "vision_config", None)):
        if sub is None:
            continue
        for key, value in (("num_hidden_layers", 1), ("depth", 1), ("vocab_size", 16), ("intermediate_size", 16),
                           ("moe_intermediate_size", 16), ("mlp_ratio", 1)):
            if hasattr(sub, key):
                setattr(sub, key, value)
        if hasattr(sub, "fullatt_block_indexes"):
            sub.fullatt_block_indexes = [0]
        if hasattr(sub, "deepstack_visual_indexes"):
            sub.deepstack_visual_indexes = []
    small = AutoModelForImageTextToText.from_config(small_cfg, dtype=dtype)
    small_bufs = dict(small.named_buffers())
    for name in meta:
        src = small_bufs.get(name)
        if src is None:
            src = small_bufs.get(re.sub(r"\.\d+\.", ".0.", name))
        if src is None:
            raise ValueError(f"cannot rebuild buffer {name} (not in the checkpoint, not in a one-layer instance)")
        _set_param(model, name, src.clone())


class WeightStreamer:
    """Materialises the blocks (`units`, (name, module)) of a meta-device model one at a time."""

    def __init__(self, model: torch.nn.Module, source: TensorSource, units: list[tuple[str, torch.nn.Module]],
                 quantized_of: Callable[[str], dict[str, QuantizedLinear] | None] | None = None,
                 install: Callable[[str, torch.nn.Module, dict[str, QuantizedLinear]], None] | None = None,
                 restore: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.source = source
        self.units = dict(units)
        self.quantized_of = quantized_of  # unit name -> its calibrated modules (None: not calibrated yet)
        self.install = install  # swaps a block's calibrated modules in
        self.restore = restore  # undoes a block's swaps (the original modules get their meta parameters back)
        self._auto: set[str] = set()  # blocks materialised by a forward hook, released after that forward
        self.plan: dict[str, list[tuple[str, str, bool, tuple[int, ...]]]] = {}
        self.live: set[str] = set()
        for name, unit in units:
            self.plan[name] = [(sub, *source.locate(f"{name}.{sub}", tuple(p.shape)), tuple(p.shape))
                               for sub, p in unit.named_parameters()]
        self._hooks = []

    def materialize(self, name: str, quantized: bool = True) -> torch.nn.Module:
        """Load block `name` (full precision; then its calibrated modules when it has them and `quantized`)."""
        unit = self.units[name]
        if name in self.live:
            return unit
        for sub, disk, transpose, _ in self.plan[name]:
            _set_param(unit, sub, self.source.read(disk, transpose))
        q = self.quantized_of(name) if quantized and self.quantized_of else None
        if q:
            self.install(name, unit, q)
        self.live.add(name)
        return unit

    def release(self, name: str) -> None:
        """Back to meta: the original submodules (fake-quant swaps undone) with meta parameters."""
        unit = self.units[name]
        if self.restore is not None:
            self.restore(name)
        for sub, _, _, shape in self.plan[name]:
            _set_param(unit, sub, torch.empty(shape, device="meta", dtype=self.source.dtype))
        self.live.discard(name)

    def attach(self) -> None:
        """Materialise every block for the duration of its forward (capture / gradient passes)."""
        for name, unit in self.units.items():
            def pre(mod, args, name=name):
                if name not in self.live:
                    self.materialize(name)
                    self._auto.add(name)

            def post(mod, args, out, name=name):
                if name in self._auto:
                    self._auto.discard(name)
                    self.release(name)

            self._hooks += [unit.register_forward_pre_hook(pre), unit.register_forward_hook(post)]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

