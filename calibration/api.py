"""`calibrate(model_dir, out_dir, config)`: the one entry point (the CLI mirrors it), a composition of the parts:

    plan (plan.py)  ->  weight source (weights.py)  ->  data  ->  [gradient pass]  ->
    layer loop (driver.py) x block calibration (block.py, target providers in targets.py)  ->  writer
    with a resume store (resume.py) and a reducer (reduce.py: one process or torchrun) throughout.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch

from vllm_qe.calibration.algorithms import get_algorithm
from vllm_qe.calibration.block import BlockCalibrator
from vllm_qe.calibration.config import CalibrationConfig
from vllm_qe.calibration.data import build_inputs, load_calibration_set
from vllm_qe.calibration.gradients import check_token_mix, mix_token_weights
from vllm_qe.calibration.model_structure import image_token_id
from vllm_qe.calibration.pipeline import calibrate_blocks, gradient_pass
from vllm_qe.calibration.plan import CalibrationPlan, build_plan
from vllm_qe.calibration.reduce import init_reducer
from vllm_qe.calibration.resume import ResumeStore
from vllm_qe.calibration.targets import Swaps
from vllm_qe.calibration.weights import load_model, open_weights
from vllm_qe.format import checkpoint as ckpt

__all__ = ["CalibrationConfig", "calibrate", "load_model", "plan_calibration"]


def plan_calibration(model_dir: str | Path, config: CalibrationConfig | None = None) -> CalibrationPlan:
    """The plan `calibrate` would follow, from the model's config and safetensors headers only (the model is built
    on the `meta` device; nothing is loaded or written)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vllm_qe.calibration.streaming import TensorSource

    config = config or CalibrationConfig()
    algorithm = get_algorithm(config.method, clip=config.clip, **config.method_params)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(str(model_dir)))
    source = TensorSource(model, model_dir)
    return build_plan(model, config, algorithm, set(source.index), source.locate,
                      model_dir)


def calibrate(model_dir: str | Path, out_dir: str | Path, config: CalibrationConfig | None = None,
              *, overwrite: bool = False, progress: bool = True, resume: bool = True) -> Path:
    """Quantize the HF VLM in `model_dir` and write a vllm-qe checkpoint to `out_dir` (atomically).

    Under `torchrun` the calibration samples are sharded across ranks, statistics are all-reduced and each
    block's input groups are split across ranks; rank 0 writes. Progress is kept in `OUT.partial/` after every
    block: a killed run started again with the same settings resumes there (`resume=False` starts over)."""
    from transformers import AutoProcessor

    config = config or CalibrationConfig()
    algorithm = get_algorithm(config.method, clip=config.clip, **config.method_params)  # bad parameters fail before any loading
    check_token_mix(config.token_importance_mix)  # before any loading, like the parameters above
    if config.offload and config.token_importance == "first_order":
        raise ValueError("offload: token_importance 'first_order' needs a whole RTN copy of the model; "
                         "use 'gradnorm' or calibrate without offload")
    t0 = time.time()
    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (use --overwrite)")
    model_cfg = ckpt.read_config(model_dir)
    weights = open_weights(model_dir, config.offload, model_cfg.get("model_type"))
    model = weights.model
    plan = build_plan(model, config, algorithm, weights.tensor_names, weights.locate, model_dir)
    t_data = time.time()
    processor = AutoProcessor.from_pretrained(str(model_dir))

    reducer = init_reducer()
    ds = load_calibration_set(config.calib, config.num_samples, config.seed)
    if reducer.world > 1:
        ds = ds.select(reducer.shard(len(ds)))
    samples = [build_inputs(processor, r["image"], r["question"], r["answer"] or None) for r in ds]
    data_seconds = time.time() - t_data
    img_tok = image_token_id(model.config)

    partial_dir = out_dir.with_name(out_dir.name + ".partial")
    fingerprint = {"model_dir": str(Path(model_dir).resolve()), "config": asdict(config), "world": reducer.world}
    store = ResumeStore(partial_dir, json.loads(json.dumps(fingerprint)), plan.scheme_of, reducer)
    if not resume and reducer.rank == 0:
        store.clear()
    swaps = Swaps(record=weights.offloaded)  # a streamed block is put back to its original modules on release
    block = BlockCalibrator(algorithm, plan.scheme_of, reducer=reducer, propagate=config.propagate,
                            seed=config.seed, gamma=plan.gamma, swaps=swaps)
    weights.attach(store, install=block.install, swaps=swaps)
    if plan.needs_gradients:
        starts = [build_inputs(processor, r["image"], r["question"])["input_ids"].shape[1] if r["answer"] else None
                  for r in ds]
        grads = store.load_gradients()  # a resumed run reuses the first run's (its model is partly quantized)
        if grads is None:
            grads = gradient_pass(model, plan.chains, samples, starts, img_tok,
                                  config.token_importance or "gradnorm", plan.scheme_of, reducer)
            store.save_gradients(grads)
        block.token_weights = (mix_token_weights(grads.token_weight, config.token_importance_mix)
                               if config.token_importance else {})
        block.unit_ratio = grads.vision_text_ratio
        block.gamma = grads.gamma
    results = calibrate_blocks(model, plan.chains, samples, img_tok, block, store=store, weights=weights,
                               progress=progress and reducer.rank == 0, max_activation_mib=config.max_activation_mib,
                               spill_dir=str(partial_dir / f"spill-rank{reducer.rank}"))
    weights.detach()
    quantized = weights.quantized(results, store)
    if reducer.rank != 0:
        reducer.barrier()  # rank 0 writes the checkpoint
        return out_dir

    model_cfg.pop("quantization_config", None)
    # seconds: model load to written checkpoint; data_seconds: the part spent loading the processor, reading the
    # calibration images and encoding the chats, which a tool handed ready-made tensors does not spend
    report = {"config": asdict(config), "seconds": round(time.time() - t0, 2),
              "data_seconds": round(data_seconds, 2), "num_samples": len(samples),
              "layer_rel_error": block.report.layers, "blocks": block.report.blocks,
              "input_groups": block.report.groups, "world_size": reducer.world,
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "offload": config.offload}
    out = weights.write(out_dir, plan, quantized, store, model_cfg, report, overwrite)
    store.clear()
    if reducer.world > 1:
        reducer.barrier()
    return out

