"""The layer loop: moves activations through the model one block at a time, and nothing else.

For each chain (vision blocks, connector, language blocks) it runs the *current* model once per sample to capture
the chain's inputs (so a chain sees the outputs of already-quantized chains: quantization-exposed across towers),
then for each unit (block) of the chain hands a `step` the block and a `Replay` of it over the cached inputs;
the step (block.py: statistics, algorithm, fake-quant swap, the replay that propagates quantized or
full-precision outputs) returns the block's outputs, which become the next block's inputs. Between blocks it
reproduces the model's own additions (Qwen3-VL adds deepstack visual features between language layers).
Only one block's activations are held at a time (plus the per-sample keyword tensors the blocks share), in an
`ActivationStore` that spills to disk past `max_activation_mib`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from vllm_qe.calibration.activations import ActivationStore
from vllm_qe.calibration.model_structure import Chain
from vllm_qe.calibration.targets import SampleContext


class _StopForward(Exception):
    pass


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _stateless(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block's keyword arguments without state a replay would mutate or read stale: KV caches (a decoder layer
    handed the model's `DynamicCache` appends its keys on every call and attends to the ones left by earlier
    calls — inputs from another pass) and the flags that ask for them."""
    from transformers.cache_utils import Cache

    return {k: (None if isinstance(v, Cache) else False if k == "use_cache" else v) for k, v in kwargs.items()}


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class Replay:
    """One block run over every calibration sample's cached inputs. `ctx` (optional) is told each sample's
    vision mask and token weight (`weights[i]`) before its forward, for the statistics hooks."""

    def __init__(self, loop: LayerLoop, unit: torch.nn.Module, calls: list[tuple[tuple, dict]],
                 hiddens: ActivationStore, masks: list[torch.Tensor]) -> None:
        self.loop, self.unit, self.calls, self.hiddens, self.masks = loop, unit, calls, hiddens, masks

    @torch.no_grad()
    def __call__(self, ctx: SampleContext | None = None,
                 weights: list[torch.Tensor] | None = None) -> ActivationStore:
        outs = self.loop.store()
        for i, ((args, kwargs), h, m) in enumerate(zip(self.calls, self.hiddens, self.masks)):
            if ctx is not None:
                ctx.mask = m
                ctx.weight = None if weights is None else weights[i]
            a, k = _with_hidden(args, kwargs, h)
            outs.append(_first(self.unit(*a, **k)).detach())
        return outs


class DeltaStore(Protocol):
    def save_deltas(self, chain_index: int, deltas: list[list[torch.Tensor | None]]) -> None: ...

    def load_deltas(self, chain_index: int) -> list[list[torch.Tensor | None]] | None: ...


class Step(Protocol):
    def __call__(self, name: str, unit: torch.nn.Module, replay: Replay, *, next_unit: int,
                 last_in_chain: bool) -> ActivationStore: ...


class LayerLoop:
    """Runs `chains` of `model` block by block over `samples`."""

    def __init__(self, model: torch.nn.Module, *, max_activation_mib: float | None = None,
                 spill_dir: str | None = None, progress: bool = True) -> None:
        self.model = model
        self.max_activation_mib = max_activation_mib  # per block's hidden states in memory; the rest spills
        self.spill_dir = spill_dir
        self.progress = progress

    def store(self) -> ActivationStore:
        return ActivationStore(self.spill_dir, self.max_activation_mib)

    @torch.no_grad()
    def capture(self, chain: Chain, samples: list[dict[str, torch.Tensor]]
                ) -> tuple[list[list[tuple[tuple, dict]]], list[list[torch.Tensor | None]], ActivationStore]:
        """Per unit, per sample: the (args, kwargs) the unit was called with in the current model, and the
        difference between its input and the previous unit's output (None when the model passes the output on
        unchanged), and the first unit's hidden-state inputs (an ActivationStore): one hidden state per sample
        whatever the depth."""
        first = self.store()
        calls: list[list[tuple[tuple, dict]]] = [[] for _ in chain.units]
        deltas: list[list[torch.Tensor | None]] = [[] for _ in chain.units]
        last_out: dict[int, torch.Tensor] = {}
        hooks = []
        for i, (_, unit) in enumerate(chain.units):
            def pre(mod, args, kwargs, i=i):
                args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
                kwargs = _stateless(kwargs)
                hidden = _hidden_of(args, kwargs)
                if i == 0:
                    first.append(hidden.detach())
                    calls[i].append(_with_hidden(args, dict(kwargs), None))
                    return
                prev = last_out.pop(i - 1)
                same = hidden is prev or (hidden.shape == prev.shape and torch.equal(hidden, prev))
                deltas[i].append(None if same else (hidden - prev).detach())
                calls[i].append(_with_hidden(args, dict(kwargs), None))

            def post(mod, args, out, i=i):
                last_out[i] = _first(out).detach()

            hooks.append(unit.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(unit.register_forward_hook(post))

        def stop(mod, args, out):
            raise _StopForward

        hooks.append(chain.units[-1][1].register_forward_hook(stop))
        try:
            for s in samples:
                with contextlib.suppress(_StopForward):
                    self.model(**s, use_cache=False)  # no KV cache: a replay must not attend to stale keys
                last_out.clear()
        finally:
            for h in hooks:
                h.remove()
        for i, (name, _) in enumerate(chain.units):
            if len(calls[i]) != len(samples):
                raise RuntimeError(f"{name}: called {len(calls[i])} times for {len(samples)} samples")
        return calls, deltas, first

    def run(self, chains: list[Chain], samples: list[dict[str, torch.Tensor]],
            masks_of: Callable[[Chain, dict[str, torch.Tensor]], torch.Tensor], step: Step, *,
            start: int = 0, start_hidden: ActivationStore | None = None, deltas: DeltaStore | None = None) -> None:
        """Every unit of `chains` in order through `step`; units before `start` (resumed progress) are skipped,
        `start_hidden` being the outputs of the last of them when `start` is inside a chain. `deltas` keeps each
        chain's between-block additions from its first capture, and a run resumed inside a chain uses those
        (a capture through already-quantized blocks measures them with other rounding)."""
        total = sum(len(c.units) for c in chains)
        bar = tqdm(total=total, desc="calibrating", unit="block", disable=not self.progress, initial=start)
        index = 0
        for chain_index, chain in enumerate(chains):
            if index + len(chain.units) <= start:
                index += len(chain.units)
                continue
            calls, added, hiddens = self.capture(chain, samples)
            if deltas is not None and start > index:
                added = deltas.load_deltas(chain_index) or added
            elif deltas is not None and any(d is not None for ds in added for d in ds):
                deltas.save_deltas(chain_index, added)
            masks = [masks_of(chain, s) for s in samples]
            for i, (name, unit) in enumerate(chain.units):
                if index < start:
                    index += 1
                    if index == start and start_hidden is not None:
                        hiddens = start_hidden
                    continue
                if i > 0 and any(d is not None for d in added[i]):  # the model's own between-block additions
                    shifted = self.store()
                    for h, d in zip(hiddens, added[i]):
                        shifted.append(h if d is None else h + d)
                    hiddens = shifted
                bar.set_postfix_str(name)
                hiddens = step(name, unit, Replay(self, unit, calls[i], hiddens, masks), next_unit=index + 1,
                               last_in_chain=i == len(chain.units) - 1)
                calls[i], added[i] = [], []  # free this block's cached inputs
                index += 1
                bar.update(1)
        bar.close()
