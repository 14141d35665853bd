"""The safetensors files of a model folder: headers read and checked by hand, so a truncated, empty or foreign
file gives a one-line error naming the file (never a raw safetensors traceback), and tensors are known by name,
dtype and shape without reading their data.

A folder holds `model.safetensors`, or shards listed by `model.safetensors.index.json` (vLLM and transformers read
only the files the index names). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_qe.format.spec import FormatError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Written first into a folder that is being built (or being replaced) and removed only when it is a checkpoint:
# a folder that holds it is refused by every reader.
INCOMPLETE_MARKER = ".vllm_qe_incomplete"

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
READ_CHUNK_BYTES = 64 * 2**20  # data checks read large tensors in slices of about this size


class _File:
    """One safetensors file, opened (memory-mapped) on first use and shared by its tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None

    def handle(self):
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt")
        return self._handle


class LazyTensor:
    """A tensor of a safetensors file known by dtype and shape; its data is read only when `load()` is called."""

    def __init__(self, path: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                 file: _File | None = None) -> None:
        self.path, self.name, self.dtype, self.shape = path, name, dtype, torch.Size(shape)
        self._file = file or _File(path)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def nbytes(self) -> int:
        return self.numel() * self.element_size()

    def load(self) -> torch.Tensor:
        return self._file.handle().get_tensor(self.name)

    def chunks(self, max_bytes: int = READ_CHUNK_BYTES):
        """The tensor's data in slices along dim 0 of at most about `max_bytes` each (one slice for 0-D/1-D)."""
        if len(self.shape) < 2 or self.nbytes() <= max_bytes:
            yield self.load()
            return
        sl = self._file.handle().get_slice(self.name)
        rows = max(1, max_bytes // max(1, self.nbytes() // self.shape[0]))
        for start in range(0, self.shape[0], rows):
            yield sl[start:start + rows]


def read_header(path: Path) -> dict[str, LazyTensor]:
    """The tensors of one safetensors file, from its header; every inconsistency (empty or truncated file, bad
    JSON, unknown dtype, data offsets outside the file or not matching dtype x shape) names the file."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                raise FormatError(f"{name}: empty file (0 bytes)")
            if len(head) < 8:
                raise FormatError(f"{name}: truncated ({size} bytes, shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise FormatError(f"{name}: truncated or not a safetensors file (header of {n} bytes, file of "
                                  f"{size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{name}: cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{name}: corrupt safetensors header (invalid JSON: {e})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{name}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    out: dict[str, LazyTensor] = {}
    file = _File(path)
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dt, shape, (start, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{name}: tensor {key}: corrupt header entry {info!r}") from e
        if dt not in ST_DTYPES:
            raise FormatError(f"{name}: tensor {key}: unsupported dtype {dt}")
        t = LazyTensor(path, key, ST_DTYPES[dt], tuple(shape), file)
        if any(s < 0 for s in shape) or end - start != t.nbytes() or start < 0:
            raise FormatError(f"{name}: tensor {key}: data offsets [{start}, {end}) do not hold {dt} {shape}")
        if end > data_size:
            raise FormatError(f"{name}: truncated (tensor {key} ends at byte {end} of the data, the file holds "
                              f"{data_size})")
        out[key] = t
    spans = sorted((t_start, t_end, k) for k, (t_start, t_end) in spans_of(header).items())
    pos = 0
    for start, end, key in spans:
        if start != pos:
            raise FormatError(f"{name}: corrupt (tensor {key} starts at data byte {start}, expected {pos}: tensors "
                              "overlap or leave a gap)")
        pos = end
    if pos != data_size:
        raise FormatError(f"{name}: corrupt ({data_size - pos} bytes after the last tensor)")
    return out


def spans_of(header: dict) -> dict[str, tuple[int, int]]:
    return {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


def read_index(model_dir: Path) -> dict[str, str] | None:
    """`weight_map` (tensor -> file name) of `model.safetensors.index.json`, or None without an index."""
    path = model_dir / INDEX_NAME
    if not path.exists():
        return None
    try:
        idx = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{INDEX_NAME}: invalid JSON ({e})") from e
    wm = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise FormatError(f"{INDEX_NAME}: weight_map: expected an object of tensor name -> file name")
    for v in wm.values():
        if "/" in v or "\\" in v or v.startswith("."):
            raise FormatError(f"{INDEX_NAME}: weight_map names file {v!r}, which is not in the folder")
    return wm


def checkpoint_tensors(model_dir: str | Path) -> dict[str, LazyTensor]:
    """Every tensor vLLM would read from the folder (headers only): the files the index names, else every
    `*.safetensors`. A shard the index names must exist, hold the tensors the index gives it and no others;
    a `*.safetensors` file outside the index is an error (vLLM would silently skip it); names are unique."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    wm = read_index(model_dir)
    if wm is not None:
        listed = sorted(set(wm.values()))
        for fname in listed:
            if not (model_dir / fname).is_file():
                tensor = next(k for k, v in wm.items() if v == fname)
                raise FormatError(f"{INDEX_NAME}: shard {fname} (holding {tensor}) does not exist")
        stray = [f.name for f in files if f.name not in set(listed)]
        if stray:
            raise FormatError(f"{stray[0]}: not listed in {INDEX_NAME} (vLLM would ignore its tensors)")
        files = [model_dir / f for f in listed]
    if not files:
        raise FormatError(f"{model_dir}: no *.safetensors files")
    out: dict[str, LazyTensor] = {}
    for f in files:
        for k, t in read_header(f).items():
            if k in out:
                raise FormatError(f"{k}: stored twice ({out[k].path.name} and {f.name})")
            if wm is not None and wm.get(k) != f.name:
                where = "is not in the index" if k not in wm else f"is indexed in {wm[k]}"
                raise FormatError(f"{f.name}: tensor {k} {where}")
            out[k] = t
    if wm is not None:
        for k, fname in wm.items():
            if k not in out:
                raise FormatError(f"{k}: missing from {fname} (listed in {INDEX_NAME})")
    return out
