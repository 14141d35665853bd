"""`QELinearMethod`: the vLLM linear method of vllm-qe (column, row, QKV, merged and replicated layers).

Parameters are declared once with vLLM's parameter classes where their sharding is standard (packed weight,
scales, zero points, the output side of the adapters) and with explicit loaders where it is not (tensors stacked
per fused checkpoint module: smoothing vectors, adapter input sides, routers). Under tensor parallelism
column-parallel layers shard the adapters' output side and row-parallel layers their input side; the router's
partial scores are all-reduced in row-parallel layers so every rank picks the same expert.

At load the base GEMM kernel is chosen once (runtime/kernels.py's registry: vLLM's mixed-precision
kernels first, then the project's kernels under kernels/); the weights stay packed. Adapters run as per-token LoRA
(kernels/adapters.py: one shrink for all modules and both kinds, one expand per module). The forward is plain torch plus registered ops, with no host synchronisation, so vLLM's
torch.compile traces it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, RowParallelLinear
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from vllm_qe.format import spec
from vllm_qe.format.packing import packed_width, shard_unit
from vllm_qe.format.quantizer import num_groups
from vllm_qe.format.spec import FormatError, ModuleScheme
from vllm_qe.kernels.adapters import adapter_delta, pack_adapters, router_scores
from vllm_qe.kernels.reference import route_grouped
from vllm_qe.runtime.kernels import KernelTarget, QEGemmKernel, QELayerSpec, choose_kernel, log_choice

_SHARD_INDEX = {"q": 0, "k": 1, "v": 2}


class QELinearMethod(LinearMethodBase):
    """Low-bit GEMM + shared low-rank expert + per-token routed low-rank experts for one vLLM linear layer."""

    def __init__(self, config, prefix: str, ckpt_modules: list[str], schemes: list[ModuleScheme]) -> None:
        self.config = config
        self.prefix = prefix
        self.ckpt_modules = ckpt_modules
        first = schemes[0]
        for name, s in zip(ckpt_modules, schemes):
            if s != first:
                raise FormatError(
                    f"{prefix}: fused modules {ckpt_modules[0]} and {name} have different schemes; vLLM fuses them "
                    "into one GEMM, so calibrate them with one scheme"
                )
        self.scheme = first

    # -- create_weights ----------------------------------------------------------------------------------------
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        s = self.scheme
        w = s.weight
        n = len(self.ckpt_modules)
        if n not in (1, len(output_partition_sizes)):
            raise FormatError(f"{self.prefix}: {n} checkpoint modules cannot fill {len(output_partition_sizes)} shards")
        in_p, out_p = input_size_per_partition, sum(output_partition_sizes)
        row_parallel = isinstance(layer, RowParallelLinear) and getattr(layer, "tp_size", 1) > 1
        if row_parallel:
            unit = shard_unit(w.bits)
            if in_p % unit or (w.group_size != -1 and in_p % w.group_size):
                raise FormatError(
                    f"{self.prefix}: input size per rank {in_p} must be a multiple of {unit} ({w.bits}-bit words) "
                    f"and of group_size {w.group_size} for tensor-parallel size {layer.tp_size}"
                )
        loader = extra_weight_attrs["weight_loader"]
        track = _tracking_loader(layer, self.prefix, loader)
        stacked = _stacked_loader(layer, self.prefix, row_parallel, in_p)
        g = num_groups(in_p, w.group_size)
        layer.qe_loaded = {}
        layer.qe_num_modules = n
        layer.qe_out_splits = list(output_partition_sizes) if n > 1 else [out_p]
        layer.qe_in = in_p
        layer.qe_input_size = input_size
        layer.qe_output_size = output_size
        layer.qe_act_dtype = params_dtype

        def reg(name: str, param: torch.nn.Parameter) -> None:
            param.qe_suffix = name
            layer.register_parameter(name, param)

        reg(spec.WEIGHT_PACKED, PackedvLLMParameter(
            data=torch.empty(out_p, packed_width(in_p, w.bits), dtype=torch.int32), input_dim=1, output_dim=0,
            packed_dim=1, packed_factor=32 // w.bits, weight_loader=track))
        scale_cls = GroupQuantScaleParameter if w.group_size != -1 else ChannelQuantScaleParameter
        scale_kw = {"input_dim": 1} if w.group_size != -1 else {}
        reg(spec.WEIGHT_SCALE, scale_cls(data=torch.empty(out_p, g, dtype=torch.float16), output_dim=0,
                                         weight_loader=track, **scale_kw))
        if not w.symmetric:
            reg(spec.WEIGHT_ZERO, scale_cls(data=torch.empty(out_p, g, dtype=torch.uint8), output_dim=0,
                                            weight_loader=track, **scale_kw))
        reg(spec.WEIGHT_SHAPE, _stacked(torch.zeros(n, 2, dtype=torch.int64), 1, None, stacked))
        if s.smooth:
            reg(spec.SMOOTH_SCALE, _stacked(torch.ones(n, in_p), 1, 1, stacked))
        a = s.adapters
        if a.shared_rank:
            r = a.shared_rank
            reg(spec.SHARED_A, _stacked(torch.zeros(n * r, in_p), r, 1, stacked))
            reg(spec.SHARED_B, ChannelQuantScaleParameter(data=torch.zeros(out_p, r), output_dim=0,
                                                          weight_loader=track))
        if a.num_routed:
            e, r = a.num_routed, a.routed_rank
            reg(spec.ROUTED_A, _stacked(torch.zeros(n * e, r, in_p), e, 2, stacked))
            reg(spec.ROUTED_B, ChannelQuantScaleParameter(data=torch.zeros(e, out_p, r), output_dim=1,
                                                          weight_loader=track))
            reg(spec.ROUTER, _stacked(torch.zeros(n * e, in_p), e, 1, stacked))
        layer.qe_row_parallel = row_parallel

    # -- process_weights_after_loading -------------------------------------------------------------------------
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        n = layer.qe_num_modules
        for name, _ in list(layer.named_parameters(recurse=False)):
            if name == "bias" or not hasattr(getattr(layer, name), "qe_suffix"):
                continue
            seen = layer.qe_loaded.get(name, set())
            if len(seen) < n:
                missing = [self.ckpt_modules[i] for i in range(n) if i not in seen] if n > 1 else self.ckpt_modules
                raise FormatError(f"{missing[0]}.{name}: missing from the checkpoint (layer {self.prefix})")
        for mod, (_, in_f) in zip(self.ckpt_modules, layer.weight_shape.tolist()):
            if in_f != layer.qe_input_size:
                raise FormatError(f"{mod}.weight_shape: input size {in_f} != model's {layer.qe_input_size}")
        scale = layer.weight_scale.data.float()
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise FormatError(f"{self.ckpt_modules[0]}.weight_scale: contains NaN/Inf or non-positive scales")
        self.kernel = self._choose_kernel(layer)
        self.kernel.process_weights_after_loading(layer)
        delattr(layer, spec.WEIGHT_SHAPE)
        if self.scheme.smooth:
            sm = layer.smooth_scale.data
            if not torch.equal(sm, sm[:1].expand_as(sm)):
                raise FormatError(f"{self.prefix}: fused modules {self.ckpt_modules} carry different smooth_scale "
                                  "tensors; they read the same input and must share one")
            layer.qe_smooth = torch.nn.Parameter(sm[0].float().clone(), requires_grad=False)
            delattr(layer, spec.SMOOTH_SCALE)
        else:
            layer.qe_smooth = None
        self._prepare_adapters(layer)

    def _choose_kernel(self, layer: torch.nn.Module) -> QEGemmKernel:
        """The base GEMM kernel of this layer (runtime/kernels.py), chosen once and logged per layer kind."""
        w, act = self.scheme.weight, self.scheme.activation
        c = QELayerSpec.build(layer.qe_input_size, layer.qe_output_size, layer.qe_in, sum(layer.qe_out_splits),
                              w.bits, w.group_size, w.symmetric, act.bits if act else 0, layer.qe_act_dtype)
        kernel = choose_kernel(c, KernelTarget.of(layer.weight_packed))
        log_choice(self.prefix.rsplit(".", 1)[-1], kernel, c)
        return kernel

    def _prepare_adapters(self, layer: torch.nn.Module) -> None:
        """Adapters in the activation dtype, in `pack_adapters`' served form (`qe_adapter_a` `[n·c, in]`,
        `qe_adapter_b` `[out, c]`); the router stays float32."""
        a = self.scheme.adapters
        if not (a.shared_rank or a.num_routed):
            return
        dt = layer.qe_act_dtype
        shared_a, shared_b = (layer.shared_a.data, layer.shared_b.data) if a.shared_rank else (None, None)
        routed_a = routed_b = None
        if a.num_routed:
            ra, rb = layer.routed_a.data, layer.routed_b.data  # [n*E, r, in], [E, out, r]
            routed_a, routed_b = ra.reshape(-1, ra.shape[-1]), rb.permute(1, 0, 2).reshape(rb.shape[1], -1)
            layer.router = torch.nn.Parameter(layer.router.data.float(), requires_grad=False)
        pa, pb = pack_adapters(layer.qe_out_splits, *(None if t is None else t.to(dt) for t in
                                                      (shared_a, shared_b, routed_a, routed_b)))
        for name in (spec.SHARED_A, spec.SHARED_B, spec.ROUTED_A, spec.ROUTED_B):
            if hasattr(layer, name):
                delattr(layer, name)
        layer.qe_adapter_a = torch.nn.Parameter(pa, requires_grad=False)
        layer.qe_adapter_b = torch.nn.Parameter(pb, requires_grad=False)

    # -- apply -------------------------------------------------------------------------------------------------
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        expert_ids = None
        a = self.scheme.adapters
        if a.num_routed:
            scores = router_scores(x2, layer.router)
            if layer.qe_row_parallel:
                from vllm.distributed import tensor_model_parallel_all_reduce

                scores = tensor_model_parallel_all_reduce(scores)
            expert_ids = route_grouped(scores, layer.qe_num_modules)
        act = self.scheme.activation
        absmax = None
        if act is not None and layer.qe_row_parallel:
            # Each rank holds a slice of the token: quantize with the whole token's scale (max over ranks).
            from vllm.distributed import get_tp_group

            xs = x2.float() if layer.qe_smooth is None else x2.float() / layer.qe_smooth
            local = xs.abs().amax(dim=-1, keepdim=True)
            absmax = get_tp_group().all_gather(local, dim=-1).amax(dim=-1, keepdim=True)
        y = self.kernel.forward(layer, x2, layer.qe_smooth, absmax)
        if a.shared_rank or a.num_routed:
            y = y + adapter_delta(x2, layer.qe_out_splits, layer.qe_adapter_a, layer.qe_adapter_b, expert_ids,
                                  a.shared_rank, a.num_routed).to(y.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])


def _shard_index(shard_id) -> int:
    if shard_id is None:
        return 0
    if isinstance(shard_id, str):
        return _SHARD_INDEX[shard_id]
    if isinstance(shard_id, int):
        return shard_id
    raise FormatError(f"unsupported shard id {shard_id!r}")


def _tracking_loader(layer: torch.nn.Module, prefix: str, loader: Callable) -> Callable:
    """Wrap vLLM's loader: remember which fused module each parameter received (to report missing tensors)."""

    def load(param, loaded_weight, *args, **kwargs):
        shard_id = args[0] if args else kwargs.get("loaded_shard_id")
        try:
            loader(param, loaded_weight, *args, **kwargs)
        except AssertionError as e:
            raise FormatError(
                f"{prefix}.{param.qe_suffix}: tensor of shape {list(loaded_weight.shape)} does not fit parameter "
                f"{list(param.shape)} of this layer (shard {shard_id!r})"
            ) from e
        layer.qe_loaded.setdefault(param.qe_suffix, set()).add(_shard_index(shard_id))

    return load


def _stacked_loader(layer: torch.nn.Module, prefix: str, row_parallel: bool, in_p: int) -> Callable:
    """Loader of tensors stacked per fused module along dim 0 (`param.qe_block` rows each); the input dimension
    `param.qe_input_dim` (in the checkpoint tensor) is narrowed to this rank's slice in row-parallel layers."""

    def load(param, loaded_weight, shard_id=None):
        idx = _shard_index(shard_id)
        t = loaded_weight
        block, in_dim = param.qe_block, param.qe_input_dim
        if block == 1 and param.dim() > t.dim():
            t = t.unsqueeze(0)
        if row_parallel and in_dim is not None:
            rank = param.tp_rank
            t = t.narrow(in_dim, rank * in_p, in_p)
        dst = param.data.narrow(0, idx * block, block)
        if tuple(dst.shape) != tuple(t.shape):
            raise FormatError(
                f"{prefix}.{param.qe_suffix} (shard {shard_id!r}): expected shape {list(dst.shape)}, "
                f"found {list(t.shape)}"
            )
        dst.copy_(t.to(dst.dtype))
        layer.qe_loaded.setdefault(param.qe_suffix, set()).add(idx)

    return load


def _stacked(data: torch.Tensor, block: int, input_dim: int | None, loader: Callable) -> BasevLLMParameter:
    p = BasevLLMParameter(data=data, weight_loader=loader)
    p.qe_block = block
    p.qe_input_dim = input_dim
    return p
