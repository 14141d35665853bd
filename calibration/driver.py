"""The layer-wise calibration driver: moves activations, calls the algorithm, never touches file formats.

For each chain (vision blocks, connector, language blocks) it runs the *current* model once per sample to capture
the chain's inputs (so a chain sees the outputs of already-quantized chains: quantization-exposed across towers),
then for each unit (block) of the chain:
1. runs the block on the cached inputs with hooks on its linear layers that stream `InputStats` (with vision/text
   token masks),
2. groups linear layers that read the same input tensor (q/k/v, gate/up) and asks the algorithm to quantize each
   group; MoE experts are targets too (`<block>.experts.<e>.<proj>`, statistics streamed per expert from the
   router's choices, see calibration/moe.py),
3. swaps the linears for `FakeQuantLinear` and re-runs the block to produce the next block's inputs
   (`propagate="quantized"`, default) or passes the full-precision outputs on (`propagate="fp"`).
Only one block's activations are held at a time (plus the per-sample keyword tensors the blocks share), in an
`ActivationStore` that spills to disk past `max_activation_mib`; with a `streamer` (--offload) only the block
being calibrated or run has its weights in memory.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_qe.calibration.activations import ActivationStore
from vllm_qe.calibration.algorithms.base import Algorithm, LinearTarget
from vllm_qe.calibration.fakequant import FakeQuantLinear
from vllm_qe.calibration.model_structure import Chain
from vllm_qe.calibration.moe import (
    ExpertInfo,
    FakeQuantExperts,
    expert_inputs,
    expert_module_names,
    expert_weight,
    find_moe_blocks,
    group_expert_modules,
    routed_tokens,
)
from vllm_qe.calibration.stats import InputStats
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.spec import EXPERT_PROJS, ModuleScheme, parse_expert_name

REPORT_TOKENS = 256


class _StopForward(Exception):
    pass


@dataclass
class LayerResult:
    name: str
    quantized: QuantizedLinear
    rel_error: float  # ||Y - Ŷ|| / ||Y|| on the layer's sampled calibration tokens


@dataclass
class DriverReport:
    layers: dict[str, float] = field(default_factory=dict)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)  # linears found to read one input tensor


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LayerwiseDriver:
    """Calibrate `chains` of `model` with `algorithm`; `scheme_of(name)` gives each linear's scheme (None = skip)."""

    def __init__(
        self,
        model: torch.nn.Module,
        algorithm: Algorithm,
        scheme_of: Callable[[str], ModuleScheme | None],
        *,
        propagate: str = "quantized",
        seed: int = 0,
        progress: bool = True,
        token_weights: dict[str, list[torch.Tensor]] | None = None,
        unit_ratio: dict[str, float] | None = None,
        gamma: float = 1.0,
        max_activation_mib: float | None = None,
        spill_dir: str | None = None,
    ) -> None:
        if propagate not in ("quantized", "fp"):
            raise ValueError(f"propagate must be 'quantized' or 'fp', got {propagate!r}")
        self.model = model
        self.algorithm = algorithm
        self.scheme_of = scheme_of
        self.propagate = propagate
        self.seed = seed
        self.progress = progress
        self.token_weights = token_weights or {}
        self.unit_ratio = unit_ratio or {}
        self.gamma = gamma  # VEQ: model-wide text/vision gradient ratio (α of text tokens in the affinity Hessian)
        self.streamer = None  # streaming.WeightStreamer when blocks live on `meta` between uses (--offload)
        self.max_activation_mib = max_activation_mib  # per block's hidden states in memory; the rest spills
        self.spill_dir = spill_dir
        self.results: dict[str, QuantizedLinear] = {}
        self.report = DriverReport()

    def _store(self) -> ActivationStore:
        return ActivationStore(self.spill_dir, self.max_activation_mib)

    # -- capture ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _capture(self, chain: Chain, samples: list[dict[str, torch.Tensor]]
                 ) -> tuple[list[list[tuple[tuple, dict]]], list[list[torch.Tensor | None]], ActivationStore]:
        """Per unit, per sample: the (args, kwargs) the unit was called with in the current model, and the
        difference between its input and the previous unit's output (None when the model passes the output on
        unchanged; Qwen3-VL adds its deepstack visual features between language layers), and the first unit's
        hidden-state inputs (an ActivationStore): one hidden state per sample whatever the depth."""
        first = self._store()
        calls: list[list[tuple[tuple, dict]]] = [[] for _ in chain.units]
        deltas: list[list[torch.Tensor | None]] = [[] for _ in chain.units]
        last_out: dict[int, torch.Tensor] = {}
        hooks = []
        for i, (_, unit) in enumerate(chain.units):
            def pre(mod, args, kwargs, i=i):
                args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
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
                    self.model(**s)
                last_out.clear()
        finally:
            for h in hooks:
                h.remove()
        for i, (name, _) in enumerate(chain.units):
            if len(calls[i]) != len(samples):
                raise RuntimeError(f"{name}: called {len(calls[i])} times for {len(samples)} samples")
        return calls, deltas, first

    # -- one unit -----------------------------------------------------------------------------------------------
    def _linears(self, unit_name: str, unit: torch.nn.Module) -> dict[str, tuple[torch.nn.Linear, ModuleScheme]]:
        out = {}
        for sub, mod in unit.named_modules():
            if isinstance(mod, torch.nn.Linear):
                full = f"{unit_name}.{sub}"
                scheme = self.scheme_of(full)
                if scheme is not None:
                    out[sub] = (mod, scheme)
        return out

    @torch.no_grad()
    def _run_unit(self, unit, calls, hiddens, masks, stats=None, linears=None, ptrs=None,
                  weights=None, moe_stats=None) -> ActivationStore:
        hooks = []
        keep: list[torch.Tensor] = []
        current: dict[str, Any] = {}
        if moe_stats:
            hooks.extend(self._moe_hooks(unit, moe_stats, current))
        if stats is not None:
            for sub, (mod, _) in linears.items():
                def hook(m, inp, sub=sub):
                    x = inp[0]
                    t = x.reshape(-1, x.shape[-1])
                    stats[sub].update(t, *_token_mask_weight(current, t.shape[0]))
                    if ptrs is not None and sub not in ptrs:
                        # Keep the tensor alive so its memory cannot be reused by a later input of another
                        # layer (identity by address alone grouped o_proj with gate/up).
                        keep.append(x)
                        ptrs[sub] = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                hooks.append(mod.register_forward_pre_hook(hook))
        outs = self._store()
        try:
            for i, ((args, kwargs), h, m) in enumerate(zip(calls, hiddens, masks)):
                current["mask"] = m
                current["weight"] = None if weights is None else weights[i]
                a, k = _with_hidden(args, kwargs, h)
                outs.append(_first(unit(*a, **k)).detach())
        finally:
            for hk in hooks:
                hk.remove()
        return outs

    def _targets(self, unit_name: str, unit: torch.nn.Module) -> dict[str, tuple[torch.Tensor, Any, ModuleScheme]]:
        """`{sub name: (weight [out, in], bias, scheme)}` of everything to quantize in `unit`: its linear layers and
        the per-expert projections of its MoE blocks (`<block>.experts.<e>.<proj>`)."""
        out = {sub: (mod.weight, mod.bias, scheme) for sub, (mod, scheme) in self._linears(unit_name, unit).items()}
        for bsub, block in find_moe_blocks(unit).items():
            experts = block.experts
            names = expert_module_names(f"{bsub}.experts", experts.gate_up_proj.shape[0])
            schemes = {n: self.scheme_of(f"{unit_name}.{n}") for n in names}
            picked = [n for n in names if schemes[n] is not None]
            if picked and len(picked) != len(names):
                raise ValueError(f"{unit_name}.{bsub}.experts: quantize all experts of an MoE block or none "
                                 f"(not quantized: {[n for n in names if schemes[n] is None][:3]}...)")
            for n in picked:
                _, e, proj = parse_expert_name(n)
                out[n] = (expert_weight(experts, e, proj), None, schemes[n])
        return out

    def _new_stats(self, in_features: int, scheme: ModuleScheme, channel_score: torch.Tensor,
                   unit_name: str) -> InputStats:
        req = self.algorithm.stats_request(scheme)
        topk = req.topk if req else 0
        st = InputStats(in_features, gram=bool(req and req.gram),
                        max_tokens=max(REPORT_TOKENS, req.max_tokens if req else 0), seed=self.seed,
                        topk=topk, channel_score=channel_score if topk else None)
        st.modality_ratio = self.unit_ratio.get(unit_name)
        return st

    def _moe_stats(self, unit_name: str, unit, targets) -> dict[str, dict[str, Any]]:
        """Per MoE block with quantized experts: one InputStats per expert for the gate/up input (shared by both
        projections) and one for the down_proj input, plus routing counts filled by the hooks."""
        out = {}
        for bsub, block in find_moe_blocks(unit).items():
            if f"{bsub}.experts.0.gate_proj" not in targets:
                continue
            experts = block.experts
            n_exp = experts.gate_up_proj.shape[0]
            scheme = targets[f"{bsub}.experts.0.gate_proj"][2]
            req = self.algorithm.stats_request(scheme)
            gu = [self._new_stats(experts.gate_up_proj.shape[2], scheme,
                                  experts.gate_up_proj[e].detach().float().abs().mean(0), unit_name)
                  for e in range(n_exp)]
            dn = [self._new_stats(experts.down_proj.shape[2], scheme,
                                  experts.down_proj[e].detach().float().abs().mean(0), unit_name)
                  for e in range(n_exp)]
            # the experts' routed-token counts per modality are the gate/up statistics' own counts
            out[bsub] = {"gate_up": gu, "down": dn, "affinity": bool(req and req.affinity),
                         "layer": torch.zeros(2, dtype=torch.long)}  # the layer's (text, vision) tokens
        return out

    def _moe_hooks(self, unit, moe_stats, current) -> list:
        """Hooks that stream each expert's routed tokens into its statistics. With `affinity` (VEQ-MA) every token
        is weighted by its router probability p_j for that expert times α_j (γ for text tokens, 1 for vision)."""
        hooks = []
        for bsub, ms in moe_stats.items():
            block = unit.get_submodule(bsub)

            def gate_hook(mod, args, out, bsub=bsub):
                current[f"probs:{bsub}"] = torch.softmax(out[0].float(), dim=-1)

            def experts_hook(mod, args, kwargs, ms=ms, bsub=bsub):
                hidden = args[0] if args else kwargs["hidden_states"]
                index = args[1] if len(args) > 1 else kwargs["top_k_index"]
                x = hidden.reshape(-1, hidden.shape[-1])
                vision, tw = _token_mask_weight(current, x.shape[0])
                tw = torch.ones(x.shape[0]) if tw is None else tw.float()
                probs = current[f"probs:{bsub}"]
                ms["layer"] += torch.tensor([int((~vision).sum()), int(vision.sum())])
                for e in range(len(ms["gate_up"])):
                    tok = routed_tokens(index.reshape(x.shape[0], -1), e)
                    if tok.numel() == 0:
                        continue
                    v = vision[tok]
                    w = tw[tok]
                    if ms["affinity"]:
                        w = w * probs[tok, e] * torch.where(v, 1.0, self.gamma)
                    xin, inter = expert_inputs(mod, e, x[tok])
                    ms["gate_up"][e].update(xin, v, w)
                    ms["down"][e].update(inter, v, w)

            hooks.append(block.gate.register_forward_hook(gate_hook))
            hooks.append(block.experts.register_forward_pre_hook(experts_hook, with_kwargs=True))
        return hooks

    def _calibrate_unit(self, unit_name, unit, calls, hiddens, masks) -> ActivationStore:
        t0 = time.perf_counter()
        targets = self._targets(unit_name, unit)
        if not targets:
            return self._run_unit(unit, calls, hiddens, masks)
        linears = {sub: (unit.get_submodule(sub), scheme) for sub, (_, _, scheme) in targets.items()
                   if parse_expert_name(sub) is None}
        stats: dict[str, InputStats] = {}
        for sub, (mod, scheme) in linears.items():
            stats[sub] = self._new_stats(mod.in_features, scheme, mod.weight.detach().float().abs().mean(0),
                                         unit_name)
        moe_stats = self._moe_stats(unit_name, unit, targets)
        ptrs: dict[str, tuple] = {}
        fp_out = self._run_unit(unit, calls, hiddens, masks, stats, linears, ptrs,
                                self.token_weights.get(unit_name), moe_stats)
        for st in stats.values():
            st.all_reduce()
        groups: dict[tuple, list[str]] = {}
        for sub in linears:
            groups.setdefault(ptrs.get(sub, (sub,)), []).append(sub)
        group_list = list(groups.values()) + self._expert_groups(moe_stats, stats)
        self.report.groups.extend([[f"{unit_name}.{s}" for s in g] for g in group_list])
        done = self._quantize_groups(unit_name, targets, stats, group_list)
        for s, (q, err) in done.items():
            self.report.layers[f"{unit_name}.{s}"] = err
            self.results[f"{unit_name}.{s}"] = q
        self.install(unit_name, unit, {s: q for s, (q, _) in done.items()})
        if self.propagate == "quantized":
            fp_out.close()
            out = self._run_unit(unit, calls, hiddens, masks)
        else:
            out = fp_out
        self.report.blocks.append({"block": unit_name, "seconds": round(time.perf_counter() - t0, 3),
                                   "peak_rss_mib": round(_max_rss_mib(), 1), "linears": len(targets),
                                   "spilled_samples": out.spilled})
        return out

    def _expert_groups(self, moe_stats, stats: dict[str, InputStats]) -> list[list[str]]:
        """Register the experts' statistics under their target names and return their input groups: per expert
        (gate, up) and (down); an algorithm with `shared_expert_scale` (VEQ-ME) gets all experts' gate/up as one
        group (one smoothing vector searched over every expert's tokens)."""
        groups: list[list[str]] = []
        for bsub, ms in moe_stats.items():
            _, world = _dist_rank_world()
            if world > 1:  # the layer's token counts over all ranks' samples (InputStats reduce their own)
                import torch.distributed as dist

                dist.all_reduce(ms["layer"])
            layer_text, layer_vision = (int(v) for v in ms["layer"])
            gate_up: list[str] = []
            for e, (gu, dn) in enumerate(zip(ms["gate_up"], ms["down"])):
                gu.all_reduce()
                dn.all_reduce()
                info = ExpertInfo(e, gu.n_tokens - gu.n_vision, gu.n_vision, layer_text, layer_vision, self.gamma)
                names = [f"{bsub}.experts.{e}.{p}" for p in EXPERT_PROJS]
                for n in names:
                    stats[n] = gu if not n.endswith("down_proj") else dn
                gu.expert = dn.expert = info
                gate_up.extend(names[:2])
                groups.append([names[2]])
                if not self.algorithm.shared_expert_scale:
                    groups.append(names[:2])
            if self.algorithm.shared_expert_scale:
                groups.append(gate_up)
        return groups

    def install(self, unit_name: str, unit: torch.nn.Module, quantized: dict[str, QuantizedLinear]) -> None:
        """Swap the quantized modules of `unit` (`{sub name: QuantizedLinear}`) for their fake-quant twins: linears
        one by one, MoE experts a whole block at a time."""
        linears, blocks = group_expert_modules(quantized)
        for sub, q in linears.items():
            self._replace(unit, sub, q, unit.get_submodule(sub).bias, self.scheme_of(f"{unit_name}.{sub}"))
        for path, per_expert in blocks.items():
            parent, _, child = path.rpartition(".")
            _swap(unit.get_submodule(parent) if parent else unit, child,
                  FakeQuantExperts(per_expert, unit.get_submodule(path).act_fn), self.streamer is not None)

    def _replace(self, unit: torch.nn.Module, sub: str, q: QuantizedLinear, bias, scheme: ModuleScheme) -> None:
        act = scheme.activation.bits if scheme.activation else None
        parent_name, _, child = sub.rpartition(".")
        _swap(unit.get_submodule(parent_name) if parent_name else unit, child,
              FakeQuantLinear(q, None if bias is None else bias.detach(), act), self.streamer is not None)

    def _quantize_groups(self, unit_name, targets, stats, groups) -> dict[str, tuple[QuantizedLinear, float | None]]:
        """Quantize every input group; under torch.distributed, group j is done by rank j % world and the
        results are exchanged, so every rank ends with all of them."""
        rank, world = _dist_rank_world()
        mine: dict[str, tuple[QuantizedLinear, float]] = {}
        for j, subs in enumerate(groups):
            if j % world != rank:
                continue
            group = [LinearTarget(f"{unit_name}.{s}", targets[s][0].detach().float(),
                                  None if targets[s][1] is None else targets[s][1].detach(),
                                  stats[s], targets[s][2]) for s in subs]
            results = self.algorithm.quantize_group(group)
            for s, tgt in zip(subs, group):
                q = results[tgt.name]
                act = tgt.scheme.activation.bits if tgt.scheme.activation else None
                x = stats[s].sample
                if x is None or len(x) == 0:  # an MoE expert no calibration token was routed to
                    mine[s] = (q, None)
                    continue
                y_ref = torch.nn.functional.linear(x, tgt.weight, tgt.bias)
                y_q = FakeQuantLinear(q, tgt.bias, act)(x)
                mine[s] = (q, float((y_q - y_ref).norm() / y_ref.norm().clamp(min=1e-12)))
        if world == 1:
            return mine
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, mine)
        merged: dict[str, tuple[QuantizedLinear, float]] = {}
        for p in parts:
            merged.update(p)
        return merged

    # -- whole model --------------------------------------------------------------------------------------------
    def run(self, chains: list[Chain], samples: list[dict[str, torch.Tensor]],
            masks_of: Callable[[Chain, dict[str, torch.Tensor]], torch.Tensor],
            state: CalibrationState | None = None) -> dict[str, QuantizedLinear]:
        """Calibrate all chains. With `state`, progress is saved after every block and a run that finds saved
        progress resumes after the last finished block (identical result: the algorithms are deterministic)."""
        total = sum(len(c.units) for c in chains)
        if self.streamer is not None and state is None:
            raise ValueError("weight streaming keeps calibrated blocks on disk: it needs a CalibrationState")
        resume_at, saved_hidden = 0, None
        if state is not None:
            resume_at, saved_hidden = state.load(self)
        bar = tqdm(total=total, desc="calibrating", unit="block", disable=not self.progress, initial=resume_at)
        index = 0
        for chain in chains:
            if index + len(chain.units) <= resume_at:
                index += len(chain.units)
                continue
            calls, deltas, hiddens = self._capture(chain, samples)
            masks = [masks_of(chain, s) for s in samples]
            for i, (name, unit) in enumerate(chain.units):
                if index < resume_at:
                    index += 1
                    if index == resume_at and saved_hidden is not None:
                        hiddens = saved_hidden
                    continue
                if i > 0 and any(d is not None for d in deltas[i]):  # the model's own between-block additions
                    shifted = self._store()
                    for h, d in zip(hiddens, deltas[i]):
                        shifted.append(h if d is None else h + d)
                    hiddens = shifted
                bar.set_postfix_str(name)
                if self.streamer is not None:
                    self.streamer.materialize(name, quantized=False)
                hiddens = self._calibrate_unit(name, unit, calls[i], hiddens, masks)
                calls[i], deltas[i] = [], []  # free this block's cached inputs
                index += 1
                if state is not None:
                    state.save(self, index, name, hiddens, last_in_chain=i == len(chain.units) - 1)
                if self.streamer is not None:  # the block's results now live in the state's unit file
                    self.streamer.release(name)
                    for n in [n for n in self.results if n.startswith(name + ".")]:
                        del self.results[n]
                bar.update(1)
        bar.close()
        return self.results


def _token_mask_weight(current: dict[str, Any], n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The current sample's vision mask and token weights for a layer input of `n` tokens: a layer whose token
    count differs from the sample's (a vision block's patches) gets the sample's one modality and no weights."""
    mask = current["mask"]
    if mask.numel() != n:
        mask = torch.full((n,), bool(mask.all()))
    w = current.get("weight")
    return mask, w if w is not None and w.numel() == n else None


def _swap(parent: torch.nn.Module, child: str, new: torch.nn.Module, record: bool) -> None:
    """Replace `parent.child`; with `record` (weight streaming) remember the original, which `release` puts back."""
    if record:
        parent.__dict__.setdefault("_vllm_qe_swapped", {}).setdefault(child, getattr(parent, child))
    setattr(parent, child, new)


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CalibrationState:
    """Progress of an interrupted calibration in `folder` (next to the output, never mistaken for a checkpoint):
    `progress.json` (written last, atomically), one `unit-NNNN.safetensors` of quantized tensors per finished block
    (rank 0), and `hidden-NNNN-rankR/` (each rank's outputs of the block before unit NNNN, one file per sample,
    when inside a chain; named by unit so a kill between writes never pairs progress with newer outputs)."""

    def __init__(self, folder, fingerprint: dict[str, Any], scheme_of: Callable[[str], ModuleScheme | None]):
        from pathlib import Path

        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.scheme_of = scheme_of

    def _progress(self) -> dict[str, Any] | None:
        import json

        p = self.folder / "progress.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def load(self, driver: LayerwiseDriver) -> tuple[int, ActivationStore | None]:
        prog = self._progress()
        if prog is None:
            return 0, None
        if prog["fingerprint"] != self.fingerprint:
            raise ValueError(f"{self.folder}: saved progress belongs to another calibration config; "
                             "remove the folder or rerun with the same settings")
        for unit_name, unit_file in prog["file_of_unit"].items() if driver.streamer is None else ():
            qs = self._read_unit(unit_file)  # (streaming: blocks are loaded on demand instead)
            driver.results.update(qs)
            driver.install(unit_name, driver.model.get_submodule(unit_name),
                           {full[len(unit_name) + 1:]: q for full, q in qs.items()})
        driver.report.layers.update(prog["layer_errors"])
        hidden = None
        rank, _ = _dist_rank_world()
        hdir = self._hidden_dir(int(prog["next_unit"]), rank)
        if prog.get("mid_chain"):
            if not hdir.is_dir():
                raise ValueError(f"{self.folder}: saved progress is inside a chain but {hdir.name} is missing")
            hidden = ActivationStore.of_files(sorted(hdir.glob("*.safetensors")))
        return int(prog["next_unit"]), hidden

    def _hidden_dir(self, next_unit: int, rank: int):
        """Outputs of the block before `next_unit` on `rank`: one safetensors file per sample (read lazily)."""
        return self.folder / f"hidden-{next_unit:04d}-rank{rank}"

    def save(self, driver: LayerwiseDriver, next_unit: int, unit_name: str, hiddens: list[torch.Tensor],
             last_in_chain: bool) -> None:
        import json
        import os
        import shutil

        from safetensors.torch import save_file

        rank, world = _dist_rank_world()
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
        import torch.distributed as dist

        if world > 1:
            dist.barrier()
        if rank != 0:
            if world > 1:
                dist.barrier()  # rank 0 has written this block's unit file (weight streaming reads it back)
            self._drop_old_hidden(next_unit, rank)
            return
        prog = self._progress() or {"fingerprint": self.fingerprint, "file_of_unit": {}, "unit_of": {},
                                    "layer_errors": {}}
        new = {n: q for n, q in driver.results.items() if n.startswith(unit_name + ".")}
        if new:
            fname = f"unit-{next_unit:04d}.safetensors"
            tensors = {}
            for n, q in new.items():
                tensors.update(q.to_tensors(n))
                prog["unit_of"][n] = unit_name
                prog["layer_errors"][n] = driver.report.layers.get(n)
            save_file(tensors, str(self.folder / fname))
            prog["file_of_unit"][unit_name] = fname
        prog["next_unit"] = next_unit
        prog["mid_chain"] = not last_in_chain
        tmp = self.folder / "progress.tmp.json"
        tmp.write_text(json.dumps(prog))
        os.replace(tmp, self.folder / "progress.json")
        if world > 1:
            dist.barrier()
        self._drop_old_hidden(next_unit, rank)

    def _drop_old_hidden(self, next_unit: int, rank: int) -> None:
        import shutil

        for d in self.folder.glob(f"hidden-*-rank{rank}"):
            if d != self._hidden_dir(next_unit, rank):
                shutil.rmtree(d, ignore_errors=True)

    def unit_quantized(self, unit_name: str) -> dict[str, QuantizedLinear] | None:
        """The calibrated modules of block `unit_name` (`{sub name: QuantizedLinear}`), None if not calibrated."""
        fname = (self._progress() or {}).get("file_of_unit", {}).get(unit_name)
        if fname is None:
            return None
        return {full[len(unit_name) + 1:]: q for full, q in self._read_unit(fname).items()}

    def _read_unit(self, fname: str) -> dict[str, QuantizedLinear]:
        """`{full module name: QuantizedLinear}` of one block's unit file."""
        from safetensors.torch import load_file

        from vllm_qe.format.checkpoint import group_module_tensors

        t = load_file(str(self.folder / fname))
        mods = sorted({k.rpartition(".")[0] for k in t})
        return {full: QuantizedLinear.from_tensors({s: t[n] for s, n in suffixes.items()}, self.scheme_of(full))
                for full, suffixes in group_module_tensors(set(t), mods).items()}

    def quantized_names(self) -> list[str]:
        """In-memory names of every module the saved blocks quantized."""
        return sorted(((self._progress() or {}).get("unit_of") or {}).keys())

    def unit_tensors(self) -> list[tuple[str, str]]:
        """(unit name, unit file) of every calibrated block, in calibration order."""
        prog = self._progress() or {}
        return list(prog.get("file_of_unit", {}).items())
