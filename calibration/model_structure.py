"""Where the blocks are: the architecture knowledge the layer-wise driver needs (one table entry per family).

A *chain* is a sequence of modules where each one's output is the next one's input (a tower's blocks); the
connector between vision tower and language model is a chain of one. Adding an architecture = one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# model_type -> (vision blocks, connector, language blocks), as attribute paths in the transformers model.
CHAINS: dict[str, tuple[str, str, str]] = {
    "qwen2_vl": ("model.visual.blocks", "model.visual.merger", "model.language_model.layers"),
    "qwen2_5_vl": ("model.visual.blocks", "model.visual.merger", "model.language_model.layers"),
    "llava": ("model.vision_tower.encoder.layers", "model.multi_modal_projector",
              "model.language_model.layers"),
    # MoE: the fused 3-D experts are quantized per expert (calibration/moe.py).
    "qwen3_vl_moe": ("model.visual.blocks", "model.visual.merger", "model.language_model.layers"),
}


@dataclass
class Chain:
    """`units`: (module name, module) in execution order; `tower`: "vision" | "connector" | "language"."""

    tower: str
    units: list[tuple[str, torch.nn.Module]]


def get_chains(model: torch.nn.Module, model_type: str) -> list[Chain]:
    if model_type not in CHAINS:
        raise ValueError(f"model_type {model_type!r} is not supported yet; supported: {sorted(CHAINS)}")
    vision, connector, language = CHAINS[model_type]
    out = []
    for tower, path in (("vision", vision), ("connector", connector), ("language", language)):
        mod = model.get_submodule(path)
        if isinstance(mod, torch.nn.ModuleList):
            units = [(f"{path}.{i}", m) for i, m in enumerate(mod)]
        else:
            units = [(path, mod)]
        out.append(Chain(tower, units))
    return out


def checkpoint_names(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """In-memory module name -> the name its weight has in the model folder's safetensors (transformers renames
    some prefixes on load and reverts them on save; asked one module at a time so the answer is unambiguous)."""
    from transformers.core_model_loading import revert_weight_conversion

    out = {}
    for n in names:
        keys = list(revert_weight_conversion(model, {f"{n}.weight": torch.zeros(1)}).keys())
        if len(keys) != 1 or not keys[0].endswith(".weight"):
            raise ValueError(f"cannot map module {n} to a checkpoint tensor name (got {keys})")
        out[n] = keys[0][: -len(".weight")]
    return out


def expert_checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """Per-expert module name in memory (`<experts>.<e>.<proj>`) -> its name in the checkpoint: the fused
    experts' checkpoint prefix + `.<e>.<proj>` (the fused tensors are replaced by per-expert modules)."""
    from transformers.core_model_loading import revert_weight_conversion

    from vllm_qe.calibration.moe import expert_module_names, is_fused_experts

    out = {}
    for path, mod in model.named_modules():
        if not is_fused_experts(mod):
            continue
        keys = list(revert_weight_conversion(model, {f"{path}.gate_up_proj": torch.zeros(1, 1, 1)}).keys())
        if len(keys) != 1 or not keys[0].endswith(".gate_up_proj"):
            raise ValueError(f"cannot map experts {path} to a checkpoint tensor name (got {keys})")
        disk = keys[0][: -len(".gate_up_proj")]
        n = mod.gate_up_proj.shape[0]
        out.update(zip(expert_module_names(path, n), expert_module_names(disk, n)))
    return out


def image_token_id(config) -> int:
    for key in ("image_token_id", "image_token_index"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    raise ValueError("model config has no image_token_id / image_token_index")
