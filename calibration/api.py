"""`calibrate(model_dir, out_dir, config)`: the one entry point (the CLI mirrors it)."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_qe.calibration import algorithms
from vllm_qe.calibration.data import BUILTIN, build_inputs, load_calibration_set
from vllm_qe.calibration.driver import CalibrationState, LayerwiseDriver
from vllm_qe.calibration.model_structure import (
    Chain,
    checkpoint_names,
    expert_checkpoint_names,
    get_chains,
    image_token_id,
)
from vllm_qe.format import checkpoint as ckpt
from vllm_qe.format.spec import (
    EXPERT_OVERRIDE,
    ActivationScheme,
    ModuleScheme,
    QEConfig,
    WeightScheme,
    matches_any,
    parse_expert_name,
)


@dataclass
class CalibrationConfig:
    """What to do. `abits=None` is weight-only (A16); `group_size=-1` is per-channel."""

    method: str = "rtn"
    wbits: int = 4
    abits: int | None = None
    group_size: int = 128
    symmetric: bool = False
    calib: str = BUILTIN
    num_samples: int = 32
    seed: int = 0
    quantize_vision: bool = True
    quantize_language: bool = True
    ignore: list[str] = field(default_factory=list)
    propagate: str = "quantized"
    token_importance: str | None = None  # TLQ: None | "gradnorm" | "first_order"
    method_params: dict[str, Any] = field(default_factory=dict)
    offload: bool = False  # stream block weights from safetensors; calibrated blocks live on disk (streaming.py)
    max_activation_mib: float | None = None  # one block's hidden states kept in memory; the rest spill to disk


def _expert_override(algo, act: ActivationScheme | None) -> dict[str, Any]:
    """The scheme override of MoE expert modules: weight-only (the VEQ settings; the MoE method has no activation
    quantization), the algorithm's expert adapters (QE: a shared low-rank expert per MoE expert, no routed ones:
    the MoE router already makes every expert token-dependent) and whether the algorithm smooths experts."""
    ov: dict[str, Any] = {"adapters": asdict(algo.expert_adapters),
                          "smooth": algo.uses_smoothing(False)}
    if act is not None:
        ov["activation"] = None
    return ov


def _source_tensor(module: str, disk_name: str) -> str:
    """The model-folder tensor a quantized module is made from: `<name>.weight`, or for a per-expert module the
    fused experts' `gate_up_proj` / `down_proj`."""
    parsed = parse_expert_name(disk_name)
    if parsed is None:
        return f"{disk_name}.weight"
    path, _, proj = parsed
    return f"{path}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"


def load_model(model_dir: str | Path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


def _init_distributed() -> tuple[int, int]:
    """Join the torch.distributed group that `torchrun` describes (gloo on CPU, NCCL on GPUs); (rank, world)."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def calibrate(model_dir: str | Path, out_dir: str | Path, config: CalibrationConfig | None = None,
              *, overwrite: bool = False, progress: bool = True, resume: bool = True) -> Path:
    """Quantize the HF VLM in `model_dir` and write a vllm-qe checkpoint to `out_dir` (atomically).

    Under `torchrun` the calibration samples are sharded across ranks, statistics are all-reduced and each
    block's layers are split across ranks; rank 0 writes. Progress is kept in `OUT.partial/` after every block:
    a killed run started again with the same settings resumes there (`resume=False` starts over)."""
    from transformers import AutoProcessor

    config = config or CalibrationConfig()
    algo = algorithms.get_algorithm(config.method, **config.method_params)
    t0 = time.time()
    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (use --overwrite)")
    model_cfg = ckpt.read_config(model_dir)
    source = None
    if config.offload:
        from vllm_qe.calibration.streaming import load_skeleton

        if config.token_importance == "first_order":
            raise ValueError("offload: token_importance 'first_order' needs a whole RTN copy of the model; "
                             "use 'gradnorm' or calibrate without offload")
        model, source = load_skeleton(
            model_dir, lambda m: [n for c in get_chains(m, model_cfg.get("model_type")) for n, _ in c.units])
    else:
        model = load_model(model_dir)
    model_type = model.config.model_type
    processor = AutoProcessor.from_pretrained(str(model_dir))
    act = None if config.abits is None else ActivationScheme(bits=config.abits)
    qcfg = QEConfig(weight=WeightScheme(config.wbits, config.group_size, config.symmetric), activation=act,
                    adapters=algo.adapters, smooth=algo.uses_smoothing(act is not None),
                    algorithm={"name": config.method, "params": config.method_params})
    experts_disk = expert_checkpoint_names(model)
    if experts_disk:
        qcfg.overrides[EXPERT_OVERRIDE] = _expert_override(algo, act)
        if qcfg.module_scheme("x.experts.0.gate_proj") == qcfg.module_scheme("x"):
            del qcfg.overrides[EXPERT_OVERRIDE]  # the experts' scheme is the default one: no override needed
    qcfg.validate()

    chains = [c for c in get_chains(model, model_type)
              if (c.tower == "language" and config.quantize_language)
              or (c.tower != "language" and config.quantize_vision)]
    all_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    disk = {**checkpoint_names(model, all_linears), **experts_disk}
    if source is not None:  # a meta skeleton has no record of transformers' load-time renames: ask the index
        for n in all_linears:
            with contextlib.suppress(KeyError):  # tied weights (lm_head) are not in the files
                disk[n] = source.locate(f"{n}.weight", tuple(model.get_submodule(n).weight.shape))[0][:-7]
    unit_names = [name for c in chains for name, _ in c.units]
    in_chains = {f"{name}.{sub}" for c in chains for name, unit in c.units
                 for sub, m in unit.named_modules() if isinstance(m, torch.nn.Linear)}
    in_chains |= {n for n in experts_disk if any(n.startswith(u + ".") for u in unit_names)}
    tensors = ckpt.load_tensors(model_dir) if source is None else dict.fromkeys(source.index)
    for n in sorted(in_chains):
        tensor = _source_tensor(n, disk[n])
        if tensor not in tensors:
            raise ValueError(f"{model_dir}: module {n} maps to {tensor}, which is not in the safetensors")

    def scheme_of(name: str) -> ModuleScheme | None:
        if name not in in_chains or qcfg.is_ignored(disk[name]) or matches_any(name, config.ignore):
            return None
        return qcfg.module_scheme(disk[name])

    rank, world = _init_distributed()
    ds = load_calibration_set(config.calib, config.num_samples, config.seed)
    if world > 1:
        ds = ds.select(range(rank, len(ds), world))
    samples = [build_inputs(processor, r["image"], r["question"], r["answer"] or None) for r in ds]
    img_tok = image_token_id(model.config)

    def masks_of(chain: Chain, s: dict[str, torch.Tensor]) -> torch.Tensor:
        if chain.tower == "language":
            return (s["input_ids"] == img_tok).reshape(-1)
        return torch.ones(1, dtype=torch.bool)

    streamer = None
    partial = out_dir.with_name(out_dir.name + ".partial")
    if not resume and rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    fingerprint = {"model_dir": str(Path(model_dir).resolve()), "config": asdict(config), "world": world}
    state = CalibrationState(partial, json.loads(json.dumps(fingerprint)), lambda n: scheme_of(n))
    if source is not None:
        from vllm_qe.calibration.streaming import WeightStreamer

        streamer = WeightStreamer(model, source, [u for c in get_chains(model, model_type) for u in c.units],
                                  quantized_of=state.unit_quantized, install=lambda *a: driver.install(*a))
        streamer.attach()
    grads = None
    if config.token_importance or algo.needs_gradients:
        grads = _gradient_stats(model, chains, ds, processor, samples, img_tok, config, scheme_of)
    driver = LayerwiseDriver(model, algo, scheme_of, propagate=config.propagate, seed=config.seed,
                             progress=progress and rank == 0,
                             token_weights=grads.token_weight if grads and config.token_importance else None,
                             unit_ratio=grads.vision_text_ratio if grads else None,
                             gamma=grads.gamma if grads else float(getattr(algo.config, "gamma", 1.0)),
                             max_activation_mib=config.max_activation_mib, spill_dir=str(partial / f"spill-rank{rank}"))
    driver.streamer = streamer
    results = driver.run(chains, samples, masks_of, state)
    if streamer is not None:
        streamer.detach()
        results = dict.fromkeys(state.quantized_names())  # the tensors are in the state's unit files
    if rank != 0:
        import torch.distributed as dist

        dist.barrier()  # rank 0 writes the checkpoint
        return out_dir

    qcfg.quantized_modules = sorted(disk[n] for n in results)
    qcfg.ignore = sorted(disk[n] for n in all_linears if n not in results)
    qcfg.ignore += sorted({disk[n].rsplit(".", 2)[0] for n in experts_disk if n not in results})
    if not any(parse_expert_name(n) for n in results):
        qcfg.overrides.pop(EXPERT_OVERRIDE, None)
    for n, q in results.items():
        tensors.pop(_source_tensor(n, disk[n]), None)
        if q is not None:
            tensors.update(q.to_tensors(disk[n]))
    model_cfg.pop("quantization_config", None)
    report = {"config": asdict(config), "seconds": round(time.time() - t0, 2), "num_samples": len(samples),
              "layer_rel_error": driver.report.layers, "blocks": driver.report.blocks,
              "input_groups": driver.report.groups}
    report["world_size"] = world
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["offload"] = config.offload
    if source is None:
        out = ckpt.write_checkpoint(out_dir, model_config=model_cfg, qconfig=qcfg, tensors=tensors,
                                    source_dir=model_dir, report=report, overwrite=overwrite)
    else:  # one shard per calibrated block + one of the untouched tensors: memory bounded by one block
        out = ckpt.write_checkpoint(out_dir, model_config=model_cfg, qconfig=qcfg,
                                    shards=_streamed_shards(state, source, disk, set(tensors)),
                                    source_dir=model_dir, report=report, overwrite=overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return out


def _streamed_shards(state: CalibrationState, source, disk: dict[str, str], rest: set[str]) -> list:
    """Shard writers (file name, () -> tensors) of a streamed calibration: the calibrated blocks' tensors from the
    state's unit files under their checkpoint names, then the source tensors that were not quantized."""
    from safetensors.torch import load_file

    units = state.unit_tensors()
    n = len(units) + 1

    def unit_shard(fname: str):
        def read() -> dict[str, torch.Tensor]:
            out = {}
            for k, v in load_file(str(state.folder / fname)).items():
                mod, _, suffix = k.rpartition(".")
                out[f"{disk[mod]}.{suffix}"] = v
            return out
        return read

    def rest_shard() -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        for name in sorted(rest):
            with safe_open(str(source.index[name]), framework="pt") as sf:
                out[name] = sf.get_tensor(name)
        return out

    shards = [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", unit_shard(f)) for i, (_, f) in enumerate(units)]
    return [*shards, (f"model-{n:05d}-of-{n:05d}.safetensors", rest_shard)]


def _gradient_stats(model, chains, ds, processor, samples, img_tok, config, scheme_of):
    """One backward pass over the calibration set (TLQ token importance, MBQ/VEQ modality ratios)."""
    from vllm_qe.calibration.gradients import collect_gradients

    starts = []
    for r in ds:
        starts.append(build_inputs(processor, r["image"], r["question"])["input_ids"].shape[1] if r["answer"] else None)
    masks = [{"language": (s["input_ids"] == img_tok).reshape(-1)} for s in samples]
    perturbed = None
    mode = config.token_importance or "gradnorm"
    if mode == "first_order":
        perturbed = _rtn_unit_outputs(model, chains, samples, scheme_of)
    gs = collect_gradients(model, chains, samples, masks, img_tok, starts, mode=mode, perturbed=perturbed)
    _, world = _init_distributed()
    if world > 1 and gs.sums:
        import torch.distributed as dist

        names = sorted(gs.sums)  # ranks see different samples: sum the gradient magnitudes and counts, then divide
        t = torch.tensor([gs.sums[n] for n in names], dtype=torch.float64)
        dist.all_reduce(t)
        gs.sums = dict(zip(names, t.tolist()))
        gs.finalize()
    return gs


@torch.no_grad()
def _rtn_unit_outputs(model, chains, samples, scheme_of) -> dict[str, list[torch.Tensor]]:
    """Block outputs of an RTN-quantized copy of the model (ĥ for the first-order token importance)."""
    import copy

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
