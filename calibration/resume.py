"""The resume store: progress of a calibration in `OUT.partial/`, saved after every block, so that a killed run
started again with the same settings continues after the last finished block (identical result: the algorithms
are deterministic).

Layout (never mistaken for a checkpoint): `progress.json` (written last, atomically), one
`unit-NNNN.safetensors` of quantized tensors per finished block (rank 0), and `hidden-NNNN-rankR/` (each rank's
outputs of the block before unit NNNN, one file per sample, when inside a chain; named by unit so a kill between
writes never pairs progress with newer outputs). Weight streaming (--offload) also reads calibrated blocks back
from the unit files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_qe.calibration.activations import ActivationStore
from vllm_qe.calibration.gradients import GradientStats
from vllm_qe.calibration.reduce import Reducer
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.spec import ModuleScheme, stored_scheme


@dataclass
class Progress:
    """What a previous run finished: units before `next_unit` are done; `hidden` the outputs of the last one
    when the next unit is inside the same chain."""

    next_unit: int
    file_of_unit: dict[str, str] = field(default_factory=dict)
    layer_errors: dict[str, float | None] = field(default_factory=dict)
    hidden: ActivationStore | None = None


class ResumeStore:
    """Saved progress in `folder` for the calibration described by `fingerprint`."""

    def __init__(self, folder: str | Path, fingerprint: dict[str, Any],
                 scheme_of: Callable[[str], ModuleScheme | None], reducer: Reducer | None = None) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.scheme_of = scheme_of
        self.reducer = reducer or Reducer()

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _progress(self) -> dict[str, Any] | None:
        p = self.folder / "progress.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def load(self) -> Progress | None:
        """The saved progress (None: start from the beginning); another config's progress is an error."""
        prog = self._progress()
        if prog is None:
            return None
        if prog["fingerprint"] != self.fingerprint:
            raise ValueError(f"{self.folder}: saved progress belongs to another calibration config; "
                             "remove the folder or rerun with the same settings")
        hidden = None
        hdir = self._hidden_dir(int(prog["next_unit"]), self.reducer.rank)
        if prog.get("mid_chain"):
            if not hdir.is_dir():
                raise ValueError(f"{self.folder}: saved progress is inside a chain but {hdir.name} is missing")
            hidden = ActivationStore.of_files(sorted(hdir.glob("*.safetensors")))
        return Progress(int(prog["next_unit"]), dict(prog["file_of_unit"]), dict(prog["layer_errors"]), hidden)

    def save_gradients(self, grads: GradientStats) -> None:
        """Keep the gradient pass's results (this rank's token weights, the all-reduced ratios): a resumed run
        must not recompute them on a model whose first blocks are already quantized."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{unit}/{i}": w.contiguous() for unit, ws in grads.token_weight.items() for i, w in enumerate(ws)}
        meta = {"vision_text_ratio": grads.vision_text_ratio, "gamma": grads.gamma, "sums": grads.sums,
                "token_weight_units": {u: len(ws) for u, ws in grads.token_weight.items()}}
        path = self._gradients_file(self.reducer.rank)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"gradients": json.dumps(meta)})
        os.replace(tmp, path)

    def load_gradients(self) -> GradientStats | None:
        """The saved gradient-pass results of this rank (None: not saved yet)."""
        from safetensors import safe_open

        path = self._gradients_file(self.reducer.rank)
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["gradients"])
            weights = {u: [f.get_tensor(f"{u}/{i}") for i in range(n)] for u, n in meta["token_weight_units"].items()}
        return GradientStats(token_weight=weights, vision_text_ratio=meta["vision_text_ratio"], gamma=meta["gamma"],
                             sums=meta["sums"])

    def save_deltas(self, chain_index: int, deltas: list[list[torch.Tensor | None]]) -> None:
        """Keep a chain's between-block additions as its first capture measured them (`deltas[unit][sample]`,
        None = nothing added): a run resumed inside the chain captures through already-quantized blocks, and
        the difference `input − previous output` then differs in its last bits."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{u}/{i}": d.contiguous() for u, ds in enumerate(deltas) for i, d in enumerate(ds) if d is not None}
        path = self._deltas_file(chain_index, self.reducer.rank)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"shape": json.dumps([len(ds) for ds in deltas])})
        os.replace(tmp, path)

    def load_deltas(self, chain_index: int) -> list[list[torch.Tensor | None]] | None:
        """The saved additions of chain `chain_index` (None: none were saved — the chain adds nothing)."""
        from safetensors import safe_open

        path = self._deltas_file(chain_index, self.reducer.rank)
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            return [[f.get_tensor(f"{u}/{i}") if f"{u}/{i}" in keys else None for i in range(n)]
                    for u, n in enumerate(json.loads(f.metadata()["shape"]))]

    def _deltas_file(self, chain_index: int, rank: int) -> Path:
        return self.folder / f"deltas-chain{chain_index}-rank{rank}.safetensors"

    def _gradients_file(self, rank: int) -> Path:
        return self.folder / f"gradients-rank{rank}.safetensors"

    def _hidden_dir(self, next_unit: int, rank: int) -> Path:
        """Outputs of the block before `next_unit` on `rank`: one safetensors file per sample (read lazily)."""
        return self.folder / f"hidden-{next_unit:04d}-rank{rank}"

    def save(self, next_unit: int, unit_name: str, quantized: dict[str, QuantizedLinear],
             layer_errors: dict[str, float | None], hiddens: ActivationStore, last_in_chain: bool) -> None:
        """Record block `unit_name` as done: its modules (`{full name: QuantizedLinear}`) and their errors, and
        (inside a chain) this rank's outputs of it."""
        from safetensors.torch import save_file

        rank, world = self.reducer.rank, self.reducer.world
        self.folder.mkdir(parents=True, exist_ok=True)
        if not last_in_chain:  # written under a new name, so the progress file never points at newer outputs
            hdir = self._hidden_dir(next_unit, rank)
            tmp = hdir.with_name(hdir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for i, h in enumerate(hiddens):
                save_file({"t": h.contiguous()}, str(tmp / f"{i:06d}.safetensors"))
            shutil.rmtree(hdir, ignore_errors=True)
            os.replace(tmp, hdir)
        if world > 1:
            self.reducer.barrier()
        if rank != 0:
            if world > 1:
                self.reducer.barrier()  # rank 0 has written this block's unit file (weight streaming reads it back)
            self._drop_old_hidden(next_unit, rank)
            return
        prog = self._progress() or {"fingerprint": self.fingerprint, "file_of_unit": {}, "unit_of": {},
                                    "layer_errors": {}}
        if quantized:
            fname = f"unit-{next_unit:04d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for n, q in quantized.items():
                tensors.update(q.to_tensors(n))
                prog["unit_of"][n] = unit_name
                prog["layer_errors"][n] = layer_errors.get(n)
            save_file(tensors, str(self.folder / fname))
            prog["file_of_unit"][unit_name] = fname
        prog["next_unit"] = next_unit
        prog["mid_chain"] = not last_in_chain
        tmp = self.folder / "progress.tmp.json"
        tmp.write_text(json.dumps(prog))
        os.replace(tmp, self.folder / "progress.json")
        if world > 1:
            self.reducer.barrier()
        self._drop_old_hidden(next_unit, rank)

    def _drop_old_hidden(self, next_unit: int, rank: int) -> None:
        for d in self.folder.glob(f"hidden-*-rank{rank}"):
            if d != self._hidden_dir(next_unit, rank):
                shutil.rmtree(d, ignore_errors=True)

    def unit_quantized(self, unit_name: str) -> dict[str, QuantizedLinear] | None:
        """The calibrated modules of block `unit_name` (`{sub name: QuantizedLinear}`), None if not calibrated."""
        fname = (self._progress() or {}).get("file_of_unit", {}).get(unit_name)
        if fname is None:
            return None
        return {full[len(unit_name) + 1:]: q for full, q in self.read_unit(fname).items()}

    def read_unit(self, fname: str) -> dict[str, QuantizedLinear]:
        """`{full module name: QuantizedLinear}` of one block's unit file."""
        from safetensors.torch import load_file

        from vllm_qe.format.checkpoint import group_module_tensors

        t = load_file(str(self.folder / fname))
        mods = sorted({k.rpartition(".")[0] for k in t})
        return {full: QuantizedLinear.from_tensors({s: t[n] for s, n in suffixes.items()}, self.scheme_of(full))
                for full, suffixes in group_module_tensors(set(t), mods).items()}

    def stored_schemes(self) -> dict[str, ModuleScheme]:
        """In-memory name -> the scheme its saved tensors realise (`spec.stored_scheme`), read from the unit files'
        headers (no tensor is loaded)."""
        from safetensors import safe_open

        from vllm_qe.format.checkpoint import group_module_tensors

        out: dict[str, ModuleScheme] = {}
        for _, fname in self.unit_files():
            with safe_open(str(self.folder / fname), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
            mods = sorted({k.rpartition(".")[0] for k in shapes})
            for full, suffixes in group_module_tensors(set(shapes), mods).items():
                out[full] = stored_scheme(self.scheme_of(full), {s: shapes[n] for s, n in suffixes.items()})
        return out

    def quantized_names(self) -> list[str]:
        """In-memory names of every module the saved blocks quantized."""
        return sorted(((self._progress() or {}).get("unit_of") or {}).keys())

    def unit_files(self) -> list[tuple[str, str]]:
        """(unit name, unit file) of every calibrated block, in calibration order."""
        prog = self._progress() or {}
        return list(prog.get("file_of_unit", {}).items())
