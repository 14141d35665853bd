"""Activation outliers in a trained model, without changing its function: the evaluation fixture that ranks methods.

Pretrained LLMs carry a few input channels whose activations are 10-1000x the median channel's (the RMSNorm gain of
those channels is large, the weights reading them are small; "massive activations", the reason AWQ protects salient
channels and SmoothQuant migrates scale). The tiny models trained here have none, so every weight quantizer looks
alike on them (docs/results.md). `inject_activation_outliers` gives a trained model that structure exactly:

- per decoder layer, a `fraction` of the hidden channels: RMSNorm gain `γ_c · s`, the columns `c` of the linears
  reading that norm (q/k/v after `input_layernorm`, gate/up after `post_attention_layernorm`) `/ s`;
- a `fraction` of the MLP's intermediate channels: `up_proj` row `j · s`, `down_proj` column `j / s` (SiLU(gate)·up
  is linear in up).

With `s` a power of two every product is exact in floating point, so the transformed model computes bit-identical
logits (`tests/test_outliers.py`); only the quantizers see different weights and activations. Language model only.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# (norm, linears reading it) inside one decoder layer
NORM_READERS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
_LAYER = re.compile(r"^(?P<prefix>.*layers\.)(?P<i>\d+)\.input_layernorm\.weight$")


def decoder_layer_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    """`'<...>layers.<i>.'` of every language-model decoder layer (vision blocks excluded), in order."""
    found = [(m["prefix"], int(m["i"])) for k in state if "visual" not in k and (m := _LAYER.match(k))]
    return [f"{p}{i}." for p, i in sorted(found, key=lambda t: t[1])]


def inject_activation_outliers(state: dict[str, torch.Tensor], scale: float = 64.0, fraction: float = 0.08,
                               seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """A copy of `state` (an HF checkpoint's tensors) with activation outliers of `scale` x in `fraction` of the
    channels (module docstring), and the chosen channels per rescaled tensor group. `scale` must be a power of two
    (> 1) so the function is preserved exactly; channels are drawn with `seed`."""
    if scale <= 1 or math.frexp(scale)[0] != 0.5:
        raise ValueError(f"scale must be a power of two > 1 (exact rescaling), got {scale}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    layers = decoder_layer_prefixes(state)
    if not layers:
        raise ValueError("no '<...>layers.<i>.input_layernorm.weight' tensor outside the vision tower: "
                         "not a decoder checkpoint this transform knows")
    out = {k: v.clone() for k, v in state.items()}
    g = torch.Generator().manual_seed(seed)
    chosen: dict[str, list[int]] = {}

    def pick(n: int) -> torch.Tensor:
        return torch.randperm(n, generator=g)[:max(1, round(fraction * n))].sort().values

    for p in layers:
        for norm, readers in NORM_READERS:
            gain = out[p + norm + ".weight"]
            ch = pick(gain.numel())
            gain[ch] *= scale
            for r in readers:
                out[p + r + ".weight"][:, ch] /= scale
            chosen[p + norm] = ch.tolist()
        up, down = out[p + "mlp.up_proj.weight"], out[p + "mlp.down_proj.weight"]
        ch = pick(up.shape[0])
        up[ch] *= scale
        down[:, ch] /= scale
        chosen[p + "mlp.up_proj"] = ch.tolist()
    return out, chosen


def write_outlier_variant(src: str | Path, dst: str | Path, scale: float = 64.0, fraction: float = 0.08,
                          seed: int = 0) -> Path:
    """Copy the HF model folder `src` to `dst` with `inject_activation_outliers` applied to its single
    `model.safetensors`; the transform's parameters and channels go to `dst/outliers.json`. Written to a temporary
    folder and renamed, so `dst` is either complete or absent."""
    src, dst = Path(src), Path(dst)
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: expected one model.safetensors (sharded checkpoints are not handled)")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; remove it first")
    state, chosen = inject_activation_outliers(load_file(str(weights)), scale, fraction, seed)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(weights.name))  # written below, transformed
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "outliers.json").write_text(json.dumps({"source": str(src), "scale": scale, "fraction": fraction,
                                                   "seed": seed, "channels": chosen}, indent=1))
    tmp.rename(dst)
    return dst
