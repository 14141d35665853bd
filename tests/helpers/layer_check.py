"""Layer-level check of the vLLM linear method against FakeQuantLinear, at any tensor-parallel size.

Run directly (world size 1) or under `torchrun --nproc-per-node N` (gloo): builds vLLM QKV, merged gate/up and
row-parallel layers with `QuantExpertsConfig`, loads synthetic QE tensors through the real weight loaders, and
compares each rank's output with the unsharded reference. Prints one JSON line per layer from rank 0.
usage: python layer_check.py METHOD_JSON  (e.g. '{"wbits": 4, "abits": 8, "qe": true}')
"""

from __future__ import annotations

import json
import os
import sys

import torch


def _synthetic_module(out_f: int, in_f: int, cfg, seed: int):
    from vllm_qe.calibration.algorithms.rtn import rtn_quantize

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    smooth = torch.rand(in_f, generator=torch.Generator().manual_seed(999)) + 0.5 if cfg.smooth else None
    q = rtn_quantize(w, cfg.weight, smooth=smooth)
    a = cfg.adapters
    if a.shared_rank:
        q.shared_a = torch.randn(a.shared_rank, in_f, generator=g) * 0.1
        q.shared_b = torch.randn(out_f, a.shared_rank, generator=g) * 0.1
    if a.num_routed:
        q.routed_a = torch.randn(a.num_routed, a.routed_rank, in_f, generator=g) * 0.1
        q.routed_b = torch.randn(a.num_routed, out_f, a.routed_rank, generator=g) * 0.1
        q.router = torch.rand(a.num_routed, in_f, generator=g)
    q = q.as_stored()  # the reference holds what the checkpoint stores (float16 adapters and router)
    bias = torch.randn(out_f, generator=g) * 0.1
    return q, bias


def main() -> None:
    from vllm.config import VllmConfig, set_current_vllm_config

    from vllm_qe.runtime.plugin import configure_amx

    configure_amx()  # as every vLLM process does (AMX permission, or AMX reported off)
    opts = json.loads(sys.argv[1])
    rank, ws = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    port = os.environ.get("MASTER_PORT", "29555")
    os.environ.setdefault("VLLM_DIST_IDENT", f"vllm-qe-layer-check-{port}")  # vLLM's CPU shm group name
    with set_current_vllm_config(VllmConfig()):
        _run(opts, rank, ws, port)


def _run(opts, rank: int, ws: int, port: str) -> None:
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    from vllm_qe.calibration.fakequant import FakeQuantLinear
    from vllm_qe.format.spec import ActivationScheme, AdapterScheme, QEConfig, WeightScheme
    from vllm_qe.runtime.config import QuantExpertsConfig

    init_distributed_environment(world_size=ws, rank=rank, local_rank=rank, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(tensor_model_parallel_size=ws)
    hidden, head_dim, n_heads, n_kv, inter = 128, 32, 4, 2, 192
    qe = QEConfig(
        weight=WeightScheme(opts["wbits"], opts.get("group_size", 32), False),
        activation=ActivationScheme(bits=opts["abits"]) if opts.get("abits") else None,
        adapters=AdapterScheme(8, 4, 8) if opts.get("qe") else AdapterScheme(), smooth=bool(opts.get("qe")),
    )
    layers = {
        "qkv_proj": (["q_proj", "k_proj", "v_proj"], ["q", "k", "v"],
                     [(n_heads * head_dim, hidden), (n_kv * head_dim, hidden), (n_kv * head_dim, hidden)]),
        "gate_up_proj": (["gate_proj", "up_proj"], [0, 1], [(inter, hidden), (inter, hidden)]),
        "down_proj": (["down_proj"], [None], [(hidden, inter)]),
    }
    qe.quantized_modules = [f"m.{s}" for names, _, _ in layers.values() for s in names]
    cfg = QuantExpertsConfig(qe)
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    dtype = getattr(torch, opts.get("dtype", "float32"))
    x = torch.randn(37, hidden, generator=torch.Generator().manual_seed(1))
    if True:
        for lname, (subs, shard_ids, shapes) in layers.items():
            if lname == "qkv_proj":
                layer = QKVParallelLinear(hidden, head_dim, n_heads, n_kv, bias=True, quant_config=cfg,
                                          prefix=f"m.{lname}", params_dtype=dtype)
            elif lname == "gate_up_proj":
                layer = MergedColumnParallelLinear(hidden, [inter, inter], bias=True, quant_config=cfg,
                                                   prefix=f"m.{lname}", params_dtype=dtype)
            else:
                layer = RowParallelLinear(inter, hidden, bias=True, quant_config=cfg, prefix=f"m.{lname}",
                                          params_dtype=dtype)
            refs = []
            for i, (sub, sid, (o, n)) in enumerate(zip(subs, shard_ids, shapes)):
                q, bias = _synthetic_module(o, n, qe, seed=10 + i)
                for full, t in q.to_tensors(sub).items():
                    suffix = full.split(".", 1)[1]
                    param = getattr(layer, suffix)
                    if sid is None:
                        param.weight_loader(param, t)
                    else:
                        param.weight_loader(param, t, sid)
                if sid is None:
                    layer.bias.weight_loader(layer.bias, bias)
                else:
                    layer.bias.weight_loader(layer.bias, bias, sid)
                refs.append(FakeQuantLinear(q, bias, qe.activation.bits if qe.activation else None))
            layer.quant_method.process_weights_after_loading(layer)
            inp = x if lname != "down_proj" else torch.randn(37, inter, generator=torch.Generator().manual_seed(2))
            inp = inp.to(dtype).float()  # the reference sees the same (rounded) input
            if lname == "down_proj":
                local = inp.chunk(ws, dim=-1)[rank]
                got = layer(local.to(dtype))[0].float()
                want = refs[0](inp)
            else:
                got = layer(inp.to(dtype))[0].float()
                want = torch.cat([r(inp).chunk(ws, dim=-1)[rank] for r in refs], dim=-1)
            err = float((got - want).abs().max())
            if rank == 0:
                print(json.dumps({"layer": lname, "tp": ws, "max_abs_err": err, "kernel": layer.quant_method.kernel.name,
                                  "ref_scale": float(want.abs().max())}), flush=True)


if __name__ == "__main__":
    main()
