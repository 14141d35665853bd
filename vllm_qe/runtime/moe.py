"""`QEMoEMethod`: the vLLM fused-MoE method of vllm-qe (`RoutedExperts` of vLLM 0.32).

The checkpoint holds each expert's projections as ordinary quantized modules `<experts>.<e>.{gate,up,down}_proj`
(docs/checkpoint-format.md, "MoE experts"); vLLM's expert loader maps them to `w13_<suffix>` (shards w1 = gate,
w3 = up) and `w2_<suffix>` with an expert id. Parameters are `[E_local, ...]` stacks with explicit loaders:
w1/w3 rows are this rank's slice of the intermediate dimension (column-parallel), w2 is sliced along its input
(row-parallel, in whole packed words and whole groups); expert parallelism maps global to local expert ids.
Experts are weight-only and carry a shared low-rank expert each (QE's correction; the MoE router already makes
every expert token-dependent). Weights stay packed; the experts' kernel is chosen once per layer from
`runtime.kernels.MOE_KERNELS` (CPU: `Int4PackMoEKernel`, else `ReferenceMoEKernel`; CUDA: `TritonMoEKernel`) and
logged per layer kind like the linear layers'. The output is reduced across ranks by vLLM's MoE runner.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

from vllm_qe.format import spec
from vllm_qe.format.packing import packed_width, shard_unit
from vllm_qe.format.quantizer import num_groups
from vllm_qe.format.spec import FormatError, ModuleScheme
from vllm_qe.runtime.kernels import KernelTarget, QELayerSpec, choose_moe_kernel, log_choice

logger = init_logger("vllm.plugins.vllm_qe")  # under the "vllm" logger, which vLLM configures

_SHARDS = {"w1": 0, "w3": 1, "w2": 0}
_CKPT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class QEMoEMethod(FusedMoEMethodBase):
    """Low-bit SwiGLU experts + a shared low-rank expert per MoE expert, for one vLLM `RoutedExperts` layer."""

    def __init__(self, moe, prefix: str, ckpt_prefix: str, scheme: ModuleScheme) -> None:
        super().__init__(moe)
        self.prefix = prefix
        self.ckpt_prefix = ckpt_prefix  # checkpoint name of the experts (`<...>.mlp.experts`)
        if scheme.activation is not None:
            raise FormatError(f"{ckpt_prefix}: MoE experts are weight-only in format v1 (activation "
                              f"{scheme.activation.bits}-bit given)")
        if scheme.adapters.num_routed:
            raise FormatError(f"{ckpt_prefix}: MoE experts carry a shared low-rank expert only in format v1 "
                              f"(num_routed={scheme.adapters.num_routed} given)")
        self.scheme = scheme

    def get_fused_moe_quant_config(self, layer):
        return None  # no vLLM modular kernel: `apply` runs vllm-qe's own op

    # -- create_weights ----------------------------------------------------------------------------------------
    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        w = self.scheme.weight
        E, H, ip = num_experts, hidden_size, intermediate_size_per_partition
        tp = layer.moe_config.tp_size
        if tp > 1 and (ip % shard_unit(w.bits) or (w.group_size != -1 and ip % w.group_size)):
            raise FormatError(
                f"{self.ckpt_prefix}: intermediate size per rank {ip} must be a multiple of {shard_unit(w.bits)} "
                f"({w.bits}-bit words) and of group_size {w.group_size} for tensor-parallel size {tp}")
        g13, g2 = num_groups(H, w.group_size), num_groups(ip, w.group_size)
        layer.qe_loaded = set()
        layer.qe_dims = (E, H, ip)
        layer.qe_act_dtype = params_dtype
        r = self.scheme.adapters.shared_rank

        def reg(name: str, data: torch.Tensor, mode: str) -> None:
            p = torch.nn.Parameter(data, requires_grad=False)
            p.qe_mode = mode
            p.weight_loader = _expert_loader(layer, self.ckpt_prefix, name)
            layer.register_parameter(name, p)

        # w13: "rows" = this rank's rows of w1 (first half) / w3 (second half); "stack" = one entry per shard.
        reg(f"w13_{spec.WEIGHT_PACKED}", torch.empty(E, 2 * ip, packed_width(H, w.bits), dtype=torch.int32), "rows")
        reg(f"w13_{spec.WEIGHT_SCALE}", torch.empty(E, 2 * ip, g13, dtype=torch.float16), "rows")
        reg(f"w13_{spec.WEIGHT_SHAPE}", torch.zeros(E, 2, 2, dtype=torch.int64), "stack")
        # w2: "cols" = this rank's slice of the input (whole words / groups); "whole" = the full tensor.
        reg(f"w2_{spec.WEIGHT_PACKED}", torch.empty(E, H, packed_width(ip, w.bits), dtype=torch.int32), "cols")
        reg(f"w2_{spec.WEIGHT_SCALE}", torch.empty(E, H, g2, dtype=torch.float16), "cols")
        reg(f"w2_{spec.WEIGHT_SHAPE}", torch.zeros(E, 2, dtype=torch.int64), "whole")
        if not w.symmetric:
            reg(f"w13_{spec.WEIGHT_ZERO}", torch.empty(E, 2 * ip, g13, dtype=torch.uint8), "rows")
            reg(f"w2_{spec.WEIGHT_ZERO}", torch.empty(E, H, g2, dtype=torch.uint8), "cols")
        if self.scheme.smooth:
            reg(f"w13_{spec.SMOOTH_SCALE}", torch.ones(E, 2, H), "stack")
            reg(f"w2_{spec.SMOOTH_SCALE}", torch.ones(E, ip), "cols")
        if r:
            reg(f"w13_{spec.SHARED_A}", torch.zeros(E, 2, r, H), "stack")
            reg(f"w13_{spec.SHARED_B}", torch.zeros(E, 2 * ip, r), "rows")
            reg(f"w2_{spec.SHARED_A}", torch.zeros(E, r, ip), "cols")
            reg(f"w2_{spec.SHARED_B}", torch.zeros(E, H, r), "whole")

    # -- process_weights_after_loading -------------------------------------------------------------------------
    def process_weights_after_loading(self, layer) -> None:
        E, H, ip = layer.qe_dims
        local_to_global = _local_to_global(layer, E)
        for name, p in layer.named_parameters(recurse=False):
            if not hasattr(p, "qe_mode"):
                continue
            shards = ("w2",) if name.startswith("w2_") else ("w1", "w3")
            for e in range(E):
                for sh in shards:
                    if (name, e, sh) not in layer.qe_loaded:
                        suffix = name.split("_", 1)[1]
                        raise FormatError(f"{self.ckpt_prefix}.{local_to_global[e]}.{_CKPT_PROJ[sh]}.{suffix}: "
                                          f"missing from the checkpoint (layer {self.prefix})")
        inter_full = ip * layer.moe_config.tp_size
        want = {"w13": torch.tensor([[inter_full, H], [inter_full, H]]), "w2": torch.tensor([H, inter_full])}
        for stem, shape in want.items():
            got = getattr(layer, f"{stem}_{spec.WEIGHT_SHAPE}").data
            bad = (got != shape).flatten(1).any(1).nonzero().flatten().tolist()
            if bad:
                e = bad[0]
                raise FormatError(f"{self.ckpt_prefix}.{local_to_global[e]}: weight_shape {got[e].tolist()} does "
                                  f"not match the model's experts (expected {shape.tolist()})")
        for stem in ("w13", "w2"):
            scale = getattr(layer, f"{stem}_{spec.WEIGHT_SCALE}").data.float()
            if not torch.isfinite(scale).all() or (scale <= 0).any():
                raise FormatError(f"{self.ckpt_prefix}: {stem} weight_scale contains NaN/Inf or non-positive scales")
        smooth13 = smooth2 = None
        if self.scheme.smooth:
            sm = getattr(layer, f"w13_{spec.SMOOTH_SCALE}").data
            if not torch.equal(sm[:, 0], sm[:, 1]):
                raise FormatError(f"{self.ckpt_prefix}: gate_proj and up_proj of an expert carry different "
                                  "smooth_scale tensors; they read the same input and must share one")
            smooth13, smooth2 = sm[:, 0].clone(), getattr(layer, f"w2_{spec.SMOOTH_SCALE}").data.clone()
        dt = layer.qe_act_dtype
        ad = self._stack_adapters(layer)
        layer.qe_adapters = None if ad is None else tuple(t.to(dt) for t in ad)
        for stem in ("w13", "w2"):
            for suffix in (spec.WEIGHT_SHAPE, spec.SMOOTH_SCALE, spec.SHARED_A, spec.SHARED_B):
                if hasattr(layer, f"{stem}_{suffix}"):
                    delattr(layer, f"{stem}_{suffix}")
        layer.qe_smooth = (smooth13, smooth2)
        w = self.scheme.weight
        spec13 = QELayerSpec.build(H, 2 * ip, H, 2 * ip, w.bits, w.group_size, w.symmetric, 0, dt)
        spec2 = QELayerSpec.build(ip, H, ip, H, w.bits, w.group_size, w.symmetric, 0, dt)
        self.kernel = choose_moe_kernel(spec13, spec2, KernelTarget.of(layer.w13_weight_packed))
        log_choice("MoE experts", self.kernel, spec13)
        self.kernel.process_weights_after_loading(layer)

    def _stack_adapters(self, layer) -> tuple[torch.Tensor, ...] | None:
        """(A13 `[E, 2r, H]`, block-diagonal B13 `[E, 2I_p, 2r]`, A2 `[E, r, I_p]`, B2 `[E, H, r]`) or None."""
        r = self.scheme.adapters.shared_rank
        if not r:
            return None
        E, H, ip = layer.qe_dims
        a13 = getattr(layer, f"w13_{spec.SHARED_A}").data.reshape(E, 2 * r, H)
        b = getattr(layer, f"w13_{spec.SHARED_B}").data
        b13 = torch.zeros(E, 2 * ip, 2 * r, dtype=b.dtype, device=b.device)
        b13[:, :ip, :r], b13[:, ip:, r:] = b[:, :ip], b[:, ip:]
        return a13, b13, getattr(layer, f"w2_{spec.SHARED_A}").data, getattr(layer, f"w2_{spec.SHARED_B}").data

    # -- apply -------------------------------------------------------------------------------------------------
    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        ids = topk_ids.long()
        weights = topk_weights
        if layer.expert_map is not None:  # expert parallelism: global -> local ids, -1 = another rank's expert
            ids = layer.expert_map[ids].long()
            weights = torch.where(ids >= 0, weights, torch.zeros_like(weights))
            ids = ids.clamp(min=0)
        ad = layer.qe_adapters or (None, None, None, None)
        return self.kernel.apply(layer, x, ids, weights, ad, layer.qe_smooth)


def _local_to_global(layer, num_local: int) -> list[int]:
    emap = getattr(layer, "expert_map", None)
    if emap is None:
        return list(range(num_local))
    out = [0] * num_local
    for g, local in enumerate(emap.tolist()):
        if local >= 0:
            out[local] = g
    return out


def _expert_loader(layer, ckpt_prefix: str, name: str) -> Callable:
    """vLLM's expert loader calls `weight_loader(param, loaded_weight, weight_name, shard_id, expert_id,
    return_success)` with one expert's checkpoint tensor; place this rank's part of it (see module docstring)."""

    def load(param, loaded_weight, weight_name=None, shard_id=None, expert_id=None, return_success=False):
        e = layer._map_global_expert_id_to_local_expert_id(expert_id)
        if e == -1:  # another rank's expert
            return False if return_success else None
        mode, rank = param.qe_mode, layer.moe_config.tp_rank
        t = loaded_weight
        if mode == "rows":
            n = param.shape[1] // 2
            dst = param.data[e].narrow(0, _SHARDS[shard_id] * n, n)
            t = t.narrow(0, rank * n, n) if t.shape[0] >= (rank + 1) * n else t
        elif mode == "stack":
            dst = param.data[e, _SHARDS[shard_id]]
        elif mode == "cols":
            n = param.shape[-1]
            dst = param.data[e]
            t = t.narrow(-1, rank * n, n) if t.shape[-1] >= (rank + 1) * n else t
        else:
            dst = param.data[e]
        where = f"{ckpt_prefix}.{expert_id}.{_CKPT_PROJ[shard_id]}.{name.split('_', 1)[1]}"
        if tuple(dst.shape) != tuple(t.shape):
            raise FormatError(f"{where}: tensor of shape {list(loaded_weight.shape)} does not fit this layer "
                              f"(expects {list(dst.shape)} per rank)")
        dst.copy_(t.to(dst.dtype))
        layer.qe_loaded.add((name, e, shard_id))
        return True if return_success else None

    return load
