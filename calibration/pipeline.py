"""The pieces `api.calibrate` composes that are more than a call: the gradient pass over the calibration set and
`calibrate_blocks` (resume store + layer loop + block calibration + weight source, for one loaded model)."""

from __future__ import annotations

import copy

import torch

from vllm_qe.calibration.block import BlockCalibrator
from vllm_qe.calibration.driver import LayerLoop, Replay
from vllm_qe.calibration.gradients import GradientStats, collect_gradients
from vllm_qe.calibration.model_structure import Chain
from vllm_qe.calibration.reduce import Reducer
from vllm_qe.calibration.resume import ResumeStore
from vllm_qe.calibration.targets import SchemeOf
from vllm_qe.calibration.weights import InMemoryWeights, OffloadedWeights
from vllm_qe.format.module import QuantizedLinear


def vision_mask(chain: Chain, sample: dict[str, torch.Tensor], image_token: int) -> torch.Tensor:
    """The vision-token mask of a chain's inputs: `[T]` for the language model, one True for the vision tower
    and the connector (all of their tokens are vision tokens)."""
    if chain.tower == "language":
        return (sample["input_ids"] == image_token).reshape(-1)
    return torch.ones(1, dtype=torch.bool)


def calibrate_blocks(model: torch.nn.Module, chains: list[Chain], samples: list[dict[str, torch.Tensor]],
                     image_token: int, block: BlockCalibrator, *, store: ResumeStore | None = None,
                     weights: InMemoryWeights | OffloadedWeights | None = None, progress: bool = True,
                     max_activation_mib: float | None = None, spill_dir: str | None = None
                     ) -> dict[str, QuantizedLinear]:
    """Calibrate every block of `chains` with `block`; with `store`, progress is saved after every block and a
    run that finds saved progress resumes after the last finished block. Returns `block.results`."""
    if weights is not None and weights.offloaded and store is None:
        raise ValueError("weight streaming keeps calibrated blocks on disk: it needs a ResumeStore")
    saved = store.load() if store is not None else None
    if saved is not None:
        if weights is None or not weights.offloaded:  # (offloaded: blocks are loaded on demand instead)
            for unit_name, unit_file in saved.file_of_unit.items():
                qs = store.read_unit(unit_file)
                block.results.update(qs)
                block.install(unit_name, model.get_submodule(unit_name),
                              {full[len(unit_name) + 1:]: q for full, q in qs.items()})
        block.report.layers.update(saved.layer_errors)

    def step(name: str, unit: torch.nn.Module, replay: Replay, *, next_unit: int,
             last_in_chain: bool):
        if weights is not None:
            weights.begin_unit(name)
        out = block(name, unit, replay)
        if store is not None:
            done = {n: q for n, q in block.results.items() if n.startswith(name + ".")}
            store.save(next_unit, name, done, block.report.layers, out, last_in_chain)
        if weights is not None:
            weights.end_unit(name, block.results)
        return out

    loop = LayerLoop(model, max_activation_mib=max_activation_mib, spill_dir=spill_dir, progress=progress)
    loop.run(chains, samples, lambda c, s: vision_mask(c, s, image_token), step,
             start=saved.next_unit if saved else 0, start_hidden=saved.hidden if saved else None, deltas=store)
    return block.results


def gradient_pass(model: torch.nn.Module, chains: list[Chain], samples: list[dict[str, torch.Tensor]],
                  answer_starts: list[int | None], image_token: int, mode: str, scheme_of: SchemeOf,
                  reducer: Reducer) -> GradientStats:
    """One backward pass over the calibration set (TLQ token importance, MBQ/VEQ modality ratios); under
    torch.distributed the gradient sums are all-reduced before the ratios."""
    masks = [{"language": (s["input_ids"] == image_token).reshape(-1)} for s in samples]
    perturbed = _rtn_unit_outputs(model, chains, samples, scheme_of) if mode == "first_order" else None
    gs = collect_gradients(model, chains, samples, masks, image_token, answer_starts, mode=mode, perturbed=perturbed)
    if reducer.world > 1 and gs.sums:
        names = sorted(gs.sums)  # ranks see different samples: sum the gradient magnitudes and counts, then divide
        t = torch.tensor([gs.sums[n] for n in names], dtype=torch.float64)
        reducer.sum_(t)
        gs.sums = dict(zip(names, t.tolist()))
        gs.finalize()
    return gs


@torch.no_grad()
def _rtn_unit_outputs(model, chains, samples, scheme_of) -> dict[str, list[torch.Tensor]]:
    """Block outputs of an RTN-quantized copy of the model (ĥ for the first-order token importance)."""
    from vllm_qe.calibration.algorithms.rtn import rtn_quantize
    from vllm_qe.calibration.fakequant import FakeQuantLinear

    qm = copy.deepcopy(model)
    for name, mod in list(qm.named_modules()):
        scheme = scheme_of(name) if isinstance(mod, torch.nn.Linear) else None
        if scheme is not None:
            parent, _, child = name.rpartition(".")
            act = scheme.activation.bits if scheme.activation else None
            setattr(qm.get_submodule(parent), child,
                    FakeQuantLinear(rtn_quantize(mod.weight.detach(), scheme.weight), mod.bias, act))
    outs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for c in chains:
        for name, _ in c.units:
            def hook(m, a, o, name=name):
                outs.setdefault(name, []).append((o[0] if isinstance(o, (tuple, list)) else o).detach())
            hooks.append(qm.get_submodule(name).register_forward_hook(hook))
    try:
        for s in samples:
            qm(**s)
    finally:
        for h in hooks:
            h.remove()
    return outs
