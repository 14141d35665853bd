"""Weight sources: where the model's weights live during calibration and how the checkpoint is written from them.

- `InMemoryWeights`: the whole model loaded by transformers; the checkpoint is the source tensors with the
  quantized modules' tensors in place of their weights.
- `OffloadedWeights` (`--offload`): the model as a `meta` skeleton with its resident tensors; one block at a time
  is materialised from the safetensors (streaming.py) and released after, calibrated blocks are read back from
  the resume store's unit files, and the checkpoint is written shard by shard (memory bounded by one block).
Both offer the same calls to the pipeline: `tensor_names` / `locate` (for the plan), `attach` / `detach`,
`begin_unit` / `end_unit` around a block's calibration, `quantized` (the results to write) and `write`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vllm_qe.calibration.model_structure import get_chains
from vllm_qe.calibration.plan import CalibrationPlan, Locate, source_tensor
from vllm_qe.calibration.resume import ResumeStore
from vllm_qe.calibration.targets import Swaps
from vllm_qe.format import checkpoint as ckpt
from vllm_qe.format.module import QuantizedLinear

Install = Callable[[str, torch.nn.Module, dict[str, QuantizedLinear]], None]


def load_model(model_dir: str | Path) -> torch.nn.Module:
    """The HF VLM in float32, eval mode."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


class InMemoryWeights:
    """The whole model in memory."""

    offloaded = False

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = model_dir
        self.model = load_model(model_dir)
        self.tensors: dict[str, torch.Tensor] | None = None

    @property
    def tensor_names(self) -> set[str]:
        return set(self._tensors())

    def _tensors(self) -> dict[str, torch.Tensor]:
        if self.tensors is None:
            self.tensors = ckpt.load_tensors(self.model_dir)
        return self.tensors

    locate: Locate | None = None

    def attach(self, store: ResumeStore, install: Install, swaps: Swaps) -> None:
        pass

    def detach(self) -> None:
        pass

    def begin_unit(self, name: str) -> None:
        pass

    def end_unit(self, name: str, results: dict[str, QuantizedLinear]) -> None:
        pass

    def quantized(self, results: dict[str, QuantizedLinear], store: ResumeStore) -> dict[str, QuantizedLinear]:
        return results

    def write(self, out_dir: Path, plan: CalibrationPlan, quantized: dict[str, QuantizedLinear],
              store: ResumeStore, model_config: dict[str, Any], report: dict[str, Any], overwrite: bool) -> Path:
        tensors = self._tensors()
        for n, q in quantized.items():
            tensors.pop(source_tensor(plan.disk[n]), None)
            tensors.update(q.to_tensors(plan.disk[n]))
        stored = {n: q.stored_scheme(plan.scheme_of(n)) for n, q in quantized.items()}
        return ckpt.write_checkpoint(out_dir, model_config=model_config, qconfig=plan.final_qconfig(stored),
                                     tensors=tensors, source_dir=self.model_dir, report=report, overwrite=overwrite)


class OffloadedWeights:
    """A `meta` skeleton whose blocks are streamed from the safetensors one at a time."""

    offloaded = True

    def __init__(self, model_dir: str | Path, model_type: str | None) -> None:
        from vllm_qe.calibration.streaming import load_skeleton

        self.model_dir = model_dir
        self.model, self.source = load_skeleton(
            model_dir, lambda m: [n for c in get_chains(m, model_type) for n, _ in c.units])
        self.streamer = None

    @property
    def tensor_names(self) -> set[str]:
        return set(self.source.index)

    def locate(self, name: str, shape: tuple[int, ...]) -> tuple[str, bool]:
        return self.source.locate(name, shape)

    def attach(self, store: ResumeStore, install: Install, swaps: Swaps) -> None:
        """Materialise every block for the duration of its forward from now on (capture and gradient passes);
        calibrated blocks come back quantized from `store`."""
        from vllm_qe.calibration.streaming import WeightStreamer

        units = [u for c in get_chains(self.model, self.model.config.model_type) for u in c.units]
        self.streamer = WeightStreamer(self.model, self.source, units, quantized_of=store.unit_quantized,
                                       install=install, restore=swaps.restore)
        self.streamer.attach()

    def detach(self) -> None:
        self.streamer.detach()

    def begin_unit(self, name: str) -> None:
        self.streamer.materialize(name, quantized=False)

    def end_unit(self, name: str, results: dict[str, QuantizedLinear]) -> None:
        """The block's results now live in the store's unit file: release it and drop them from memory."""
        self.streamer.release(name)
        for n in [n for n in results if n.startswith(name + ".")]:
            del results[n]

    def quantized(self, results: dict[str, QuantizedLinear], store: ResumeStore) -> dict[str, None]:
        return dict.fromkeys(store.quantized_names())  # the tensors are in the store's unit files

    def write(self, out_dir: Path, plan: CalibrationPlan, quantized: dict[str, Any], store: ResumeStore,
              model_config: dict[str, Any], report: dict[str, Any], overwrite: bool) -> Path:
        """One shard per calibrated block + one of the untouched tensors: memory bounded by one block."""
        rest = set(self.source.index) - {source_tensor(plan.disk[n]) for n in quantized}
        return ckpt.write_checkpoint(out_dir, model_config=model_config, qconfig=plan.final_qconfig(store.stored_schemes()),
                                     shards=self._shards(store, plan.disk, rest), source_dir=self.model_dir,
                                     report=report, overwrite=overwrite)

    def _shards(self, store: ResumeStore, disk: dict[str, str], rest: set[str]) -> list:
        """Shard writers (file name, () -> tensors): the calibrated blocks' tensors from the store's unit files
        under their checkpoint names, then the source tensors that were not quantized."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        units = store.unit_files()
        n = len(units) + 1

        def unit_shard(fname: str):
            def read() -> dict[str, torch.Tensor]:
                out = {}
                for k, v in load_file(str(store.folder / fname)).items():
                    mod, _, suffix = k.rpartition(".")
                    out[f"{disk[mod]}.{suffix}"] = v
                return out
            return read

        def rest_shard() -> dict[str, torch.Tensor]:
            out = {}
            for name in sorted(rest):
                with safe_open(str(self.source.index[name]), framework="pt") as sf:
                    out[name] = sf.get_tensor(name)
            return out

        shards = [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", unit_shard(f)) for i, (_, f) in enumerate(units)]
        return [*shards, (f"model-{n:05d}-of-{n:05d}.safetensors", rest_shard)]


def open_weights(model_dir: str | Path, offload: bool, model_type: str | None) -> InMemoryWeights | OffloadedWeights:
    return OffloadedWeights(model_dir, model_type) if offload else InMemoryWeights(model_dir)
