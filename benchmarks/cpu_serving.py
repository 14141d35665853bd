"""CPU serving benchmark through vLLM itself: FP bf16 (stock vLLM) vs W4 g128 (vllm-qe plugin) vs W4 + QE adapters.

    python benchmarks/cpu_serving.py [--layers 4] [--workdir runs/bench-cpu] [--out docs/benchmarks/cpu.md]

One command, one run, side by side. The model has Qwen2-VL-2B's widths (hidden 1536, MLP 8960, 12/2 heads,
random N(0, 0.02) weights; `vllm_qe.testing.scale_models`) and `--layers` of its 28 text layers; the vocabulary is
scaled by the same fraction (151936·layers/28) so the tied lm_head keeps the share of the weights it has in the
real model (at 4 layers with the full vocabulary the lm_head would be 55 % of all linear weights instead of 15 %
and would dominate decode time). Vision tower: 1 block, not quantized, not exercised (text prompts).

Variants, each served by `vllm.LLM` in its own process with the serving defaults (bf16, vLLM's default
compilation, prefix caching off so repeats re-prefill):
- `bf16`: the FP model, stock vLLM (no quantization);
- `W4`: RTN W4 g128 asymmetric checkpoint, vllm-qe plugin, no adapters;
- `W4+QE`: the same base with QE-shaped adapters (shared rank 4 + 4 routed experts of rank 4 + router, smoothing)
  on every quantized module, random values (speed and memory only), ≈0.3 bit/weight.

Figures per variant: resident bytes of the quantized layers (the plugin's tensors: packed weights, scales, zero
points, adapters, routers; the bf16 model's same layers), whole-model weight bytes, the worker's peak RSS
(`ru_maxrss`, KV cache capped at 1 GiB), prefill tokens/s (prompt 128, batch 1 and 8) and decode tokens/s
(32 new tokens after a 32-token prompt, batch 1 and 8; decode time = time(1 + 32 tokens) - time(1 token)),
best of `--repeats`. CPU timings on a shared 2-core machine are noisy: compare the ratios within one run.

The table also carries microbenchmarks, measured in this process when the table is rendered (`--render-only`
re-renders from WORKDIR/results.json and re-measures them): routed adapters (masked vs vLLM's punica ops), the base
GEMM of one MLP projection from 1 to 512 tokens (torch's int4 GEMM, vLLM's CPUWNA16, dequantize + dense GEMM, the
plugin's dispatch, bf16), and the GEMMs of one batch-1 decode step (`decode_breakdown`). `--profile` runs each
variant once more under torch's profiler (16 batch-1 decode steps, self time per op) into WORKDIR/profile.json,
which later renders add as a section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_LAYERS, REAL_VOCAB = 28, 151936
LABELS = ("bf16 (stock vLLM)", "W4 g128 (vllm-qe)", "W4 g128 + QE (vllm-qe)", "W4A8 g128 sym (vllm-qe)",
          "W4A8 g128 sym + QE (vllm-qe)")
QE_ADAPTERS = {"shared_rank": 4, "num_routed": 4, "routed_rank": 4, "top_k": 1}


# -- building the checkpoints ----------------------------------------------------------------------------------------
def build_model(out: Path, layers: int) -> Path:
    if not (out / "config.json").exists():
        _write_model(out, layers)
    cfg = json.loads((out / "config.json").read_text())
    if not cfg.get("architectures"):  # vLLM and the checkpoint validator resolve the model class from it
        cfg["architectures"] = ["Qwen2VLForConditionalGeneration"]
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _write_model(out: Path, layers: int) -> None:
    from vllm_qe.testing import scale_models

    name = f"qwen2_vl_2b_l{layers}"
    vocab = -(-REAL_VOCAB * layers // REAL_LAYERS // 64) * 64
    base = scale_models.CONFIGS["qwen2_vl_2b"]
    scale_models.CONFIGS[name] = {"text": {**base["text"], "vocab_size": vocab}, "vision": base["vision"]}
    scale_models.write_random_model(name, out, text_layers=layers, vision_depth=1)


def quantize_rtn(model: Path, out: Path, abits: int | None = None, symmetric: bool = False) -> Path:
    from vllm_qe.calibration.api import CalibrationConfig, calibrate

    if (out / "config.json").exists():
        return out
    return calibrate(model, out, CalibrationConfig(method="rtn", wbits=4, abits=abits, symmetric=symmetric,
                                                   group_size=128, num_samples=2, quantize_vision=False),
                     overwrite=True, progress=False)


def add_qe_adapters(rtn: Path, out: Path, seed: int = 0) -> tuple[Path, float]:
    """A copy of `rtn` whose every quantized module carries QE-shaped adapters (random, small) and a smoothing
    vector of ones; returns (folder, adapter bits per quantized weight as served in bf16, router in fp32)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vllm_qe.format import spec

    cfg = json.loads((rtn / "config.json").read_text())
    qc = cfg["quantization_config"]
    a = QE_ADAPTERS
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(rtn, out)
    index = out / "model.safetensors.index.json"
    if index.exists():
        wmap = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            wmap = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    g = torch.Generator().manual_seed(seed)
    tensors, adapter_bits, weights = {}, 0, 0
    for name in qc["quantized_modules"]:
        with safe_open(str(out / wmap[f"{name}.{spec.WEIGHT_SHAPE}"]), "pt") as f:
            out_f, in_f = (int(v) for v in f.get_tensor(f"{name}.{spec.WEIGHT_SHAPE}"))
        r, e, rr = a["shared_rank"], a["num_routed"], a["routed_rank"]
        t = {spec.SMOOTH_SCALE: torch.ones(in_f),
             spec.SHARED_A: torch.randn(r, in_f, generator=g) * 0.01,
             spec.SHARED_B: torch.randn(out_f, r, generator=g) * 0.01,
             spec.ROUTED_A: torch.randn(e, rr, in_f, generator=g) * 0.01,
             spec.ROUTED_B: torch.randn(e, out_f, rr, generator=g) * 0.01,
             spec.ROUTER: torch.rand(e, in_f, generator=g)}
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in t.items()})
        adapter_bits += 16 * (r + e * rr) * (in_f + out_f) + 32 * e * in_f
        weights += in_f * out_f
    shard = "model-qe-adapters.safetensors"
    save_file(tensors, str(out / shard), metadata={"format": "pt"})
    wmap.update({k: shard for k in tensors})
    index.write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    qc["adapters"], qc["smooth"] = dict(a), True
    qc.pop("storage", None)  # the informational bits-per-weight record of the RTN files no longer holds
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out, adapter_bits / weights


# -- one variant, inside its own process ------------------------------------------------------------------------------
def run_variant(ckpt: str, quantized: bool, repeats: int, eager: bool, profile_dir: str | None = None) -> dict:
    """Serve `ckpt` with `vllm.LLM` and measure it (module docstring); with `profile_dir`, instead profile 16
    batch-1 decode steps with torch's profiler in the worker and return `decode_profile`'s table."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_qe.serving import engine_kwargs

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model ships a function to the worker
    kw = engine_kwargs(ckpt, enable_prefix_caching=False, max_num_seqs=8, limit_mm_per_prompt={"image": 0})
    if not quantized:
        kw.pop("quantization")
    if eager:
        kw["enforce_eager"] = True
    if profile_dir:
        kw["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": os.path.abspath(profile_dir),
                                 "torch_profiler_with_stack": False, "torch_profiler_use_gzip": False}
    t0 = time.time()
    llm = LLM(**kw)
    startup = time.time() - t0
    rng = random.Random(0)

    def prompts(n: int, length: int) -> list[TokensPrompt]:
        return [TokensPrompt(prompt_token_ids=[rng.randrange(10, 500) for _ in range(length)]) for _ in range(n)]

    def timed(ps, new_tokens: int) -> float:
        sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            llm.generate(ps, sp, use_tqdm=False)
            best = min(best, time.perf_counter() - t)
        return best

    timed(prompts(2, 16), 4)  # warm-up
    if profile_dir:
        ps, steps = prompts(1, 8), 16
        sp = SamplingParams(max_tokens=1 + steps, temperature=0.0, ignore_eos=True)
        llm.generate(ps, sp, use_tqdm=False)
        llm.start_profile()
        t = time.perf_counter()
        llm.generate(ps, sp, use_tqdm=False)
        wall = time.perf_counter() - t
        llm.stop_profile()
        return {"wall_ms_per_step": wall * 1e3 / (1 + steps), "ops": decode_profile(Path(profile_dir), 1 + steps)}
    res = {"startup_s": startup}
    for b in (1, 8):
        ps = prompts(b, 128)
        res[f"prefill_tok_s_b{b}"] = b * 128 / timed(ps, 1)
        ps = prompts(b, 32)
        t1, t33 = timed(ps, 1), timed(ps, 33)
        res[f"decode_tok_s_b{b}"] = b * 32 / max(t33 - t1, 1e-9)
    from vllm_qe.runtime.memory import weight_report

    res.update(llm.apply_model(weight_report)[0])
    return res


def decode_profile(trace_dir: Path, steps: int, top: int = 14) -> list[tuple[str, float, float]]:
    """Self time per op name in the worker's torch-profiler trace(s) under `trace_dir` (chrome JSON): the `top`
    names as (name, ms per step, calls per step), then everything else as one row. Self time = an event's
    duration minus its children's (events nested on the same thread)."""
    self_us: dict[str, float] = {}
    calls: dict[str, int] = {}
    for f in sorted(trace_dir.rglob("*.json")):
        events = [e for e in json.loads(f.read_text()).get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
        by_thread: dict[tuple, list] = {}
        for e in events:
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
        for evs in by_thread.values():
            evs.sort(key=lambda e: (e["ts"], -e["dur"]))
            stack: list[dict] = []
            for e in evs:
                while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                    stack.pop()
                if stack:
                    stack[-1]["_child"] = stack[-1].get("_child", 0) + e["dur"]
                stack.append(e)
            for e in evs:
                name = e["name"]
                self_us[name] = self_us.get(name, 0.0) + e["dur"] - e.get("_child", 0)
                calls[name] = calls.get(name, 0) + 1
    order = sorted(self_us, key=self_us.get, reverse=True)
    rows = [(n, self_us[n] / 1e3 / steps, calls[n] / steps) for n in order[:top]]
    rest = order[top:]
    rows.append((f"{len(rest)} other names", sum(self_us[n] for n in rest) / 1e3 / steps,
                 sum(calls[n] for n in rest) / steps))
    return rows


def adapters_microbench(repeats: int = 20) -> list[tuple[int, float, float]]:
    """Routed adapters of one 2B-width MLP projection (in 1536, out 8960, 4 experts of rank 4, bf16):
    (tokens, masked ms, vLLM torch punica ms) per call, best of `repeats`."""
    import torch

    from vllm_qe.kernels.adapters import routed_masked, routed_punica

    K, N, E, r = 1536, 8960, QE_ADAPTERS["num_routed"], QE_ADAPTERS["routed_rank"]
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(E, r, K, generator=g) * 0.01).bfloat16()
    b = (torch.randn(E, N, r, generator=g) * 0.01).bfloat16()
    a_all, b_all = a.reshape(E * r, K), b.permute(1, 0, 2).reshape(N, E * r).contiguous()
    rows = []
    for T in (1, 8, 128):
        x = torch.randn(T, K, generator=g).bfloat16()
        ids = torch.randint(0, E, (T,), generator=g)
        times = [_best_ms(fn, repeats) for fn in (lambda x=x, ids=ids: routed_masked(x, a_all, b_all, ids, E),
                                                    lambda x=x, ids=ids: routed_punica(x, a, b, ids))]
        rows.append((T, *times))
    return rows


def _best_ms(fn, repeats: int) -> float:
    """Best wall time of `fn()` in ms over `repeats` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


GEMM_TOKENS = (1, 8, 32, 64, 128, 512)


def gemm_microbench(repeats: int = 5) -> list[tuple[int, ...]]:
    """Base GEMM of one 2B-width MLP projection (in 1536, out 8960, W4 g128 symmetric, bf16 activations):
    (tokens, torch int4 GEMM ms, vLLM CPUWNA16 W4A16 ms, vLLM CPUWNA16 W4A8 ms (`int4_scaled_mm_cpu`; nan without
    AMX), dequantize + dense GEMM ms, the plugin's dispatch ms, bf16 `F.linear` ms), best of `repeats`. AMX as the
    plugin configures a vLLM process (`plugin.configure_amx`)."""
    from unittest import mock

    import torch
    import vllm.envs as envs
    import vllm.model_executor.parameter as vparam
    from vllm.model_executor.kernels.linear import CPUWNA16LinearKernel, MPLinearLayerConfig
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter
    from vllm.scalar_type import scalar_types

    from vllm_qe.format.packing import pack
    from vllm_qe.kernels.int4pack_cpu import int4pack_mm
    from vllm_qe.runtime.plugin import configure_amx

    configure_amx()
    K, N, g = 1536, 8960, 128
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.int32)
    s = (torch.rand(N, K // g, generator=gen) * 0.01 + 1e-3).bfloat16()
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([s.float().t(), torch.zeros(K // g, N)], -1).contiguous().bfloat16()

    def vllm_layer(w4a8: bool):
        layer = torch.nn.Module()
        with mock.patch.object(vparam, "get_tensor_model_parallel_rank", return_value=0), \
                mock.patch.object(vparam, "get_tensor_model_parallel_world_size", return_value=1):
            layer.weight_packed = PackedvLLMParameter(data=pack(q, 4), input_dim=1, output_dim=0, packed_dim=1,
                                                      packed_factor=8, weight_loader=None)
            layer.weight_scale = GroupQuantScaleParameter(data=s, output_dim=0, input_dim=1, weight_loader=None)
        layer.bias = None
        kernel = CPUWNA16LinearKernel(MPLinearLayerConfig((K, N), (K, N), scalar_types.uint4b8, torch.bfloat16, g,
                                                          False), "weight_packed", "weight_scale", "weight_zero_point")
        with mock.patch.object(envs, "VLLM_CPU_INT4_W4A8", w4a8, create=True):
            kernel.process_weights_after_loading(layer)
        return (lambda x: kernel.apply_weights(layer, x)) if getattr(layer, "use_w4a8", False) == w4a8 else None

    wna16, wa8 = vllm_layer(False), vllm_layer(True)
    dense = (torch.randn(N, K, generator=gen) * 0.02).bfloat16()
    rows = []
    for T in GEMM_TOKENS:
        x = torch.randn(T, K, generator=gen).bfloat16()
        fns = (lambda x=x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, g, sz),
               lambda x=x: wna16(x),
               (lambda x=x: wa8(x)) if wa8 else None,
               lambda x=x: int4pack_mm(x, w4, g, sz, min_tokens=1),
               lambda x=x: torch.ops.vllm_qe.int4pack_linear(x, w4, g, sz),
               lambda x=x: torch.nn.functional.linear(x, dense))
        rows.append((T, *(_best_ms(fn, repeats if T <= 128 else 2) if fn else float("nan") for fn in fns)))
    return rows


def decode_breakdown(layers: int, repeats: int = 10) -> dict[str, float]:
    """What one batch-1 decode step of the benchmark model spends in its GEMMs, per op kind, in ms (best of
    `repeats`, this process's threads): the quantized projections of `layers` text layers (qkv 1536->2048, o
    1536->1536, gate_up 1536->17920, down 8960->1536) through torch's int4 GEMM vs stock vLLM's bf16 linear (oneDNN
    with a prepacked weight, `_custom_ops.onednn_mm`), the bf16 lm_head (same op)
    (vocabulary scaled as the model's), and the QE adapters at one token (router, argmin, shared + routed
    shrink/expand, smoothing division: what `QELinearMethod.apply` adds, eager; served packed form and the
    earlier unpacked one)."""
    import torch
    from vllm import _custom_ops as ops

    from vllm_qe.kernels.adapters import adapter_delta, adapter_delta_unpacked, pack_adapters
    from vllm_qe.kernels.int4pack_cpu import int4pack_mm
    from vllm_qe.kernels.reference import route_grouped, router_scores

    gen = torch.Generator().manual_seed(0)
    vocab = -(-REAL_VOCAB * layers // REAL_LAYERS // 64) * 64
    shapes = {"qkv_proj": (1536, [1536, 256, 256]), "o_proj": (1536, [1536]), "gate_up_proj": (1536, [8960, 8960]),
              "down_proj": (8960, [1536])}
    a = QE_ADAPTERS
    E = a["num_routed"]
    out = {"int4": 0.0, "bf16": 0.0, "adapters": 0.0, "adapters_unpacked": 0.0}
    for k, splits in shapes.values():
        n = sum(splits)
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([torch.rand(k // 128, n, generator=gen) * 0.01, torch.zeros(k // 128, n)], -1).bfloat16()
        dense = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
        x = torch.randn(1, k, generator=gen).bfloat16()
        m, r, rr = len(splits), a["shared_rank"], a["routed_rank"]
        sa, sb = torch.randn(m * r, k).bfloat16(), torch.randn(n, r).bfloat16()
        ra, rb = torch.randn(m * E * rr, k).bfloat16(), torch.randn(n, E * rr).bfloat16()
        router, smooth = torch.rand(m * E, k), torch.rand(k) + 0.5

        pa, pb = pack_adapters(splits, sa, sb, ra, rb)

        def qe(x=x, splits=splits, m=m, pa=pa, pb=pb, router=router, smooth=smooth, r=r):
            ids = route_grouped(router_scores(x, router), m)
            xs = (x.float() / smooth).to(x.dtype)
            return xs, adapter_delta(x, splits, pa, pb, ids, r, E)

        def qe_unpacked(x=x, splits=splits, m=m, sa=sa, sb=sb, ra=ra, rb=rb, router=router, smooth=smooth):
            ids = route_grouped(router_scores(x, router), m)
            xs = (x.float() / smooth).to(x.dtype)
            return xs, adapter_delta_unpacked(x, splits, sa, sb, ra, rb, ids, E)

        out["int4"] += layers * _best_ms(lambda x=x, w4=w4, sz=sz: int4pack_mm(x, w4, 128, sz), repeats)
        h = ops.create_onednn_mm(dense.t(), 32)  # what stock vLLM's CPU bf16 linear runs (prepacked oneDNN)
        out["bf16"] += layers * _best_ms(lambda x=x, h=h: ops.onednn_mm(h, x, None), repeats)
        out["adapters"] += layers * _best_ms(qe, repeats)
        out["adapters_unpacked"] += layers * _best_ms(qe_unpacked, repeats)
    head = (torch.randn(vocab, 1536, generator=gen) * 0.02).bfloat16()
    x = torch.randn(1, 1536, generator=gen).bfloat16()
    h = ops.create_onednn_mm(head.t(), 32)
    out["lm_head"] = _best_ms(lambda: ops.onednn_mm(h, x, None), repeats)
    return out


def render_profile(prof: dict, a) -> str:
    """Markdown of `--profile`'s decode-step tables (one per variant)."""
    meta = prof.pop("_meta", {})
    lines = ["## Where a batch-1 decode step goes (torch profiler in the worker)", "",
             f"Command: `python benchmarks/cpu_serving.py --layers {a.layers} --threads {a.threads} --profile` "
             "(a separate run: one engine per variant, prompt of 8 tokens, 1 + 16 new tokens profiled; load average "
             + ", ".join(f"{x:.1f}" for x in meta.get("load", [])) + "). Self time per op name, per step; the "
             "profiler's own overhead inflates the many small ops, so read it as shares, not as speeds.", ""]
    for label, r in prof.items():
        # the profiler's own region event spans the whole run (not a step's op): left out; what no op of the
        # worker covers (engine core scheduling, inter-process hand-off, Python between steps) is wall - ops.
        ops = [(n, ms, c) for n, ms, c in r["ops"] if not n.startswith("PyTorch Profiler")]
        covered = sum(ms for _, ms, _ in ops)
        lines += [f"**{label}**: {r['wall_ms_per_step']:.1f} ms per step (wall, profiled)", "",
                  "| op | ms / step | calls / step |", "|---|---|---|"]
        lines += [f"| `{n}` | {ms:.2f} | {c:.1f} |" for n, ms, c in ops]
        lines += [f"| (no worker op: scheduler, hand-off between processes) | {r['wall_ms_per_step'] - covered:.2f} | |",
                  ""]
    return "\n".join(lines)


def _min_tokens() -> int:
    from vllm_qe.kernels.int4pack_cpu import INT4_DEQUANT_MIN_TOKENS

    return INT4_DEQUANT_MIN_TOKENS


# -- driver ------------------------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", default="runs/bench-cpu")
    p.add_argument("--out", default="docs/benchmarks/cpu.md")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compilation)")
    p.add_argument("--threads", type=int, default=1,
                   help="OpenMP threads of the vLLM worker (bound to cores 0..N-1; default 1: on a machine shared "
                        "with other jobs, a 2-thread barrier waits for a descheduled thread on every op)")
    p.add_argument("--render-only", action="store_true", help="re-render OUT from WORKDIR/results.json")
    p.add_argument("--reuse", action="store_true",
                   help="keep variants whose WORKDIR/result-N.json exists (continue an interrupted run)")
    p.add_argument("--profile", action="store_true",
                   help="profile 16 batch-1 decode steps of each variant (torch profiler in the worker) and write "
                        "WORKDIR/profile.json instead of the serving table")
    p.add_argument("--profile-dir", help=argparse.SUPPRESS)
    p.add_argument("--variant", nargs=3, metavar=("CKPT", "QUANTIZED", "JSON"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:  # child process: one engine
        ckpt, quantized, out = a.variant
        res = run_variant(ckpt, quantized == "1", a.repeats, a.eager, a.profile_dir)
        Path(out).write_text(json.dumps(res))
        return 0

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if a.render_only:
        if (work / "results.json").exists():
            saved = json.loads((work / "results.json").read_text())
            return write_table(a, saved.pop("_meta", {}), saved)
        done = {label: json.loads((work / f"result-{i}.json").read_text()) for i, label in enumerate(LABELS)
                if (work / f"result-{i}.json").exists()}
        return write_table(a, {}, done)
    t0 = time.time()
    model = build_model(work / f"qwen2vl-2b-widths-l{a.layers}", a.layers)
    rtn = quantize_rtn(model, work / f"{model.name}-rtn-w4g128")
    qe, qe_bits = add_qe_adapters(rtn, work / f"{model.name}-rtn-w4g128-qe")
    a8 = quantize_rtn(model, work / f"{model.name}-rtn-w4a8g128s", abits=8, symmetric=True)
    a8qe, _ = add_qe_adapters(a8, work / f"{model.name}-rtn-w4a8g128s-qe")
    print(f"checkpoints ready in {time.time() - t0:.0f}s; QE adapters {qe_bits:.3f} bit/weight", flush=True)
    variants = dict(zip(LABELS, [(model, False), (rtn, True), (qe, True), (a8, True), (a8qe, True)]))
    results = {}
    load = [os.getloadavg()[0]]
    for label, (ckpt, quantized) in variants.items():
        out = work / f"{'profile' if a.profile else 'result'}-{len(results)}.json"
        trace = work / f"trace-{len(results)}"
        if a.reuse and out.exists():
            results[label] = json.loads(out.read_text())
            print(f"[{label}] reusing {out}", flush=True)
            continue
        cmd = [sys.executable, __file__, "--variant", str(ckpt), "1" if quantized else "0", str(out),
               "--repeats", str(a.repeats)] + (["--eager"] if a.eager else [])
        if a.profile:
            shutil.rmtree(trace, ignore_errors=True)
            cmd += ["--profile-dir", str(trace)]
        # no compile cache: its key does not cover the plugin's code, a stale graph could be replayed
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_DISABLE_COMPILE_CACHE="1",
                   VLLM_CPU_OMP_THREADS_BIND="0" if a.threads == 1 else f"0-{a.threads - 1}")
        print(f"[{label}] serving {ckpt}", flush=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-5000:])
            return 1
        results[label] = json.loads(out.read_text())
        load.append(os.getloadavg()[0])
        print(json.dumps({k: v for k, v in results[label].items() if k not in ("linear", "quantized")}), flush=True)
    if a.profile:
        (work / "profile.json").write_text(json.dumps({**results, "_meta": {"load": load}}, indent=1))
        return 0
    meta = {"qe_bits": qe_bits, "load": load}
    (work / "results.json").write_text(json.dumps({**results, "_meta": meta}, indent=1))
    return write_table(a, meta, results)


def write_table(a, meta: dict, results: dict) -> int:
    import torch

    torch.set_num_threads(a.threads)
    table = render(results, a, meta.get("qe_bits"), meta.get("load"), adapters_microbench(), gemm_microbench(),
                   decode_breakdown(a.layers))
    prof = Path(a.workdir) / "profile.json"
    if prof.exists():
        table += render_profile(json.loads(prof.read_text()), a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(table)
    print(table)
    return 0


def render(results: dict, a, qe_bits: float | None, load: list[float] | None,
           micro: list[tuple[int, float, float]], gemm: list[tuple[int, float, float, float, float, float]],
           decode: dict[str, float]) -> str:
    labels = list(LABELS)
    missing = {"summary": {"kernels": "not run", "layers": 0}, "quantized": {}}
    fp, w4, qe, a8, a8qe = (results.get(k, missing) for k in labels)
    results = {k: results.get(k, missing) for k in labels}
    # bf16 bytes of the quantized layers, 2·out·in each: vLLM's CPU bf16 linear hands its weights to oneDNN / sgl-kernel
    # (prepacked, outside the module's parameters), so the stock model's parameters do not show them.
    fp_q = sum(ref for _, ref in w4["quantized"].values())

    def q_bytes(r: dict) -> int:
        return fp_q if r is fp else sum(b for b, _ in r["quantized"].values())

    mib = 2**20
    rows = [("quantized layers' resident bytes (MiB)", lambda r: f"{q_bytes(r) / mib:.1f}"),
            ("... vs bf16", lambda r: f"{q_bytes(r) / fp_q:.1%}"),
            ("parameters + buffers (MiB, see note)", lambda r: f"{r['model_bytes'] / mib:.1f}"),
            ("worker peak RSS (MiB)", lambda r: f"{r['peak_rss_kib'] / 1024:.0f}")]
    for kind in ("prefill", "decode"):
        for b in (1, 8):
            key = f"{kind}_tok_s_b{b}"
            rows.append((f"{kind} tok/s, batch {b}", lambda r, k=key: f"{r[k]:.1f}"))
            rows.append(("... vs bf16", lambda r, k=key: f"{r[k] / fp[k]:.2f}x"))
    rows.append(("engine startup (s)", lambda r: f"{r['startup_s']:.0f}"))
    lines = ["# CPU serving: FP bf16 (stock vLLM) vs W4 g128 (vllm-qe) vs W4 + QE adapters", "",
             f"Command: `python benchmarks/cpu_serving.py --layers {a.layers} --repeats {a.repeats} --threads "
             f"{a.threads}{' --eager' if a.eager else ''}{' --reuse' if a.reuse else ''}` "
             f"({'an interrupted run continued with --reuse: ' if a.reuse else ''}every figure below comes from it).",
             "",
             f"Model: Qwen2-VL-2B widths, {a.layers} of 28 text layers, vocabulary scaled to "
             f"{-(-REAL_VOCAB * a.layers // REAL_LAYERS // 64) * 64} (lm_head keeps its real share), random weights; "
             f"{w4['summary']['layers']} quantized layers. QE adapters: shared rank {QE_ADAPTERS['shared_rank']}, "
             f"{QE_ADAPTERS['num_routed']} routed experts of rank {QE_ADAPTERS['routed_rank']}, router, smoothing "
             f"= {qe_bits or float('nan'):.3f} bit/weight (bf16 adapters, fp32 router). Kernels: "
             f"W4 {w4['summary']['kernels']}, W4+QE {qe['summary']['kernels']}, W4A8 {a8['summary']['kernels']}, "
             f"W4A8+QE {a8qe['summary']['kernels']}. dtype bf16, "
             f"{'eager' if a.eager else 'vLLM default compilation'}, {a.threads} OpenMP thread(s), best of {a.repeats}; "
             "load average " + (", ".join(f"{x:.1f}" for x in load) + " (start, after each variant)" if load else
                                "not recorded") + " on a 2-core machine shared with other jobs.", "",
             "Note: the bf16 column of the quantized layers is their bf16 size (2 bytes · out · in); vLLM's CPU bf16 "
             "linear layers keep their weights prepacked (oneDNN / sgl-kernel handles) outside the module parameters, so the stock "
             "model's 'parameters + buffers' row misses them (its worker peak RSS does not).", "",
             "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    def cell(fn, r) -> str:
        try:
            return fn(r)
        except (KeyError, ZeroDivisionError):
            return "n/a"

    for name, fn in rows:
        lines.append(f"| {name} | " + " | ".join(cell(fn, results[k]) for k in labels) + " |")
    def ratio(r: dict, base: dict, key: str, fmt: str, slower: bool = False) -> str:
        try:
            v = r[key] / base[key]
        except (KeyError, ZeroDivisionError):
            return "n/a"
        return format(1 - v if slower else v, fmt)

    def vs_bf16(r: dict) -> str:
        return ", ".join(f"{k.split('_tok')[0]} b{k[-1]} {ratio(r, fp, k, '.2f')}x"
                         for k in ("prefill_tok_s_b1", "prefill_tok_s_b8", "decode_tok_s_b1", "decode_tok_s_b8"))

    lines += ["", "Targets (issue 22): W4A8 (+ QE) ≥ 1.3x bf16 at prefill batch 1 and 8 and decode batch 8, ≥ 2.5x "
              f"at decode batch 1: W4A8 {vs_bf16(a8)}; W4A8 + QE {vs_bf16(a8qe)}. W4A16 ≥ 1.0x everywhere: "
              f"{vs_bf16(w4)}. Resident ≤ 35 % of bf16: W4A8 {cell(lambda r: f'{q_bytes(r) / fp_q:.1%}', a8)}, "
              f"W4A8 + QE {cell(lambda r: f'{q_bytes(r) / fp_q:.1%}', a8qe)}. QE adapters ≤ 10 % over the same "
              f"base: W4A8 decode b1 {ratio(a8qe, a8, 'decode_tok_s_b1', '+.1%', True)}, prefill b1 "
              f"{ratio(a8qe, a8, 'prefill_tok_s_b1', '+.1%', True)} slower.", "",
              "Targets (issue 12): W4 resident ≤ 35 % of bf16 (adapters included): "
              f"W4 {cell(lambda r: f'{q_bytes(r) / fp_q:.1%}', w4)}, "
              f"W4+QE {cell(lambda r: f'{q_bytes(r) / fp_q:.1%}', qe)}; decode batch 1 ≥ 2x bf16: "
              f"{ratio(w4, fp, 'decode_tok_s_b1', '.2f')}x; adapters ≤ 15 % over plain W4 at batch 1: decode "
              f"{ratio(qe, w4, 'decode_tok_s_b1', '+.1%', True)} (prefill "
              f"{ratio(qe, w4, 'prefill_tok_s_b1', '+.1%', True)}) slower.", "",
              "Routed adapters of one MLP projection (in 1536, out 8960, 4 experts of rank 4, bf16), per call, best "
              f"of 20, {a.threads} thread(s): vllm-qe's masked shrink/expand (kernels/adapters.py `routed_masked`; "
              "the plugin serves the same masking inside its packed form, `adapter_delta`) vs vLLM's torch "
              "punica ops (`bgmv_shrink` + `bgmv_expand`, which gather every token's adapter weights).", "",
              "| tokens | masked (ms) | vLLM torch punica (ms) |", "|---|---|---|"]
    lines += [f"| {t} | {m:.3f} | {p:.3f} |" for t, m, p in micro] + [""]
    lines += ["Base GEMM of one MLP projection (in 1536, out 8960, W4 g128 sym, bf16), per call, best of 5 (2 at 512 "
              f"tokens), {a.threads} thread(s), AMX as the plugin configures a vLLM process: torch's int4 GEMM vs "
              "vLLM's CPUWNA16 W4A16 (`cpu_gemm_wna16`; AMX path where the CPU has it) vs vLLM's CPUWNA16 W4A8 "
              "(`int4_scaled_mm_cpu`, int8 activations: what W4A8 checkpoints run on AMX CPUs; n/a without AMX) vs "
              "dequantizing torch's int4pack bytes (in column chunks) + bf16 GEMM vs the plugin's W4A16 dispatch "
              f"(`vllm_qe::int4pack_linear`: int4 GEMM below {_min_tokens()} tokens, dequantize + GEMM from there) vs "
              "bf16 `F.linear` on a resident bf16 weight (oneDNN).",
              "", "| tokens | torch int4 (ms) | vLLM CPUWNA16 W4A16 (ms) | vLLM W4A8 int8 x int4 (ms) | "
              "dequant + F.linear (ms) | plugin W4A16 dispatch (ms) | bf16 F.linear (ms) |",
              "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join([str(row[0])] + [f"{v:.2f}" if v == v else "n/a" for v in row[1:]]) + " |"
              for row in gemm] + [""]
    step = {k: 1e3 / r["decode_tok_s_b1"] for k, r in (("bf16", fp), ("w4", w4), ("qe", qe))
            if "decode_tok_s_b1" in r}
    gemm_w4, gemm_bf = decode["int4"] + decode["lm_head"], decode["bf16"] + decode["lm_head"]
    lines += ["One batch-1 decode step: its GEMMs timed outside vLLM (this process, "
              f"{a.threads} thread(s), best of 10; `decode_breakdown`) against the step time served above "
              "(1 / decode tok/s). The rest of a step is attention, norms, rotary, sampling over the vocabulary, "
              "the scheduler and vLLM's Python.", "",
              "| ms per decode step, batch 1 | bf16 | W4 | W4 + QE |", "|---|---|---|---|",
              f"| quantized projections ({a.layers} layers) | {decode['bf16']:.1f} | {decode['int4']:.1f} | "
              f"{decode['int4']:.1f} |",
              f"| QE adapters + router + smoothing (eager; served packed form) | - | - | {decode['adapters']:.1f} |",
              f"| ... the same, unpacked (before this run's change) | - | - | {decode['adapters_unpacked']:.1f} |",
              f"| lm_head (bf16, unquantized) | {decode['lm_head']:.1f} | {decode['lm_head']:.1f} | "
              f"{decode['lm_head']:.1f} |",
              "| served step (1 / decode tok/s) | " + " | ".join(
                  f"{step[k]:.1f}" if k in step else "n/a" for k in ("bf16", "w4", "qe")) + " |",
              "| rest of the step (served - GEMMs) | " + " | ".join(
                  f"{step[k] - g:.1f}" if k in step else "n/a"
                  for k, g in (("bf16", gemm_bf), ("w4", gemm_w4), ("qe", gemm_w4 + decode["adapters"]))) + " |",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":  # vLLM spawns workers that re-import __main__
    sys.exit(main())
