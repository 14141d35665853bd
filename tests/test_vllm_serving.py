"""Serving math equals calibration math: vLLM's greedy tokens and logprobs = transformers fake-quant model."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers.amx import amx_usable
from tests.helpers.compare import assert_greedy_close, assert_same, make_requests, run_transformers, run_vllm
from vllm_qe.calibration.fakequant import load_fake_quant_model

pytestmark = pytest.mark.vllm

# float32 end to end; vLLM's CPU attention and HF's eager attention differ only by summation order.
LOGPROB_ATOL = 2e-3
ACT_QUANT_LOGPROB_ATOL = 3e-2


QE_SMALL = {"k": 8, "num_routed": 4, "shared_rank": 8, "routed_rank": 8}


@pytest.mark.parametrize("arch, method, cfg", [
    ("qwen2_vl", "rtn", dict(wbits=4, abits=8)),
    ("llava", "rtn", dict(wbits=3, abits=None)),
    ("qwen2_5_vl", "rtn", dict(wbits=4, abits=None)),
    # --offload writes a sharded checkpoint (one shard per block + index): vLLM and transformers read it
    ("qwen2_vl", "gptq", dict(wbits=4, abits=None, offload=True)),
    # MoE: attention, vision tower and every expert quantized (QEMoEMethod through vLLM's expert loader)
    ("qwen3_vl_moe", "rtn", dict(wbits=4, abits=None)),
    # VEQ-ME+MA: per-expert smoothing shared by gate/up, GPTQ on the affinity Hessian; W3 words straddle
    ("qwen3_vl_moe", "veq", dict(wbits=3, abits=None, method_params={"mode": "me+ma"})),
    # VEQ+QE: shared low-rank expert per MoE expert (block-diagonal w13 adapters), routed experts elsewhere
    ("qwen3_vl_moe", "qe", dict(wbits=4, abits=None, method_params={**QE_SMALL, "base": "veq"})),
    # QE: smoothing + shared + routed experts + router, through vLLM's fused qkv_proj / gate_up_proj layers
    ("qwen2_vl", "qe", dict(wbits=4, abits=None, method_params=QE_SMALL)),
    ("llava", "qe", dict(wbits=3, abits=None, method_params=QE_SMALL)),
    # QE under a byte budget: ranks and smoothing differ per layer kind and per block, declared by `re:` and
    # exact-name overrides written against checkpoint names (vLLM renames the modules)
    ("qwen2_vl", "qe", dict(abits=6, method_params={"adapter_bpw": 1.0, "num_routed": 2})),
])
def test_vllm_matches_fake_quant_transformers(arch, method, cfg, quantized_dir, tmp_path):
    ckpt = quantized_dir(arch, method, **cfg)
    reqs = make_requests(ckpt, tmp_path)
    v = run_vllm(ckpt, reqs, tmp_path)
    h = run_transformers(load_fake_quant_model(ckpt), ckpt, reqs)
    # activation quantization turns the attention's summation-order noise into whole quantization steps where an
    # activation sits at a rounding boundary (6 bits: 1/31 of the token's max); the tolerance of such schemes
    # (as in the tensor-parallel test) covers one such step
    assert_same(v, h, LOGPROB_ATOL if cfg.get("abits") is None else ACT_QUANT_LOGPROB_ATOL)


# bf16: every GEMM input and output is rounded to 8 mantissa bits (vLLM's kernels, the reference's activations);
# on these tiny random models the logprobs then move by a few 1e-2.
BF16_LOGPROB_ATOL = 0.25
BF16_NEAR_TIE = 0.25


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("arch, method, cfg, compiled", [
    ("qwen2_vl", "rtn", dict(wbits=4, abits=None), True),  # torch's int4 GEMM for every layer
    # symmetric W4A8 on AMX machines: vLLM's int8 x int4 (int4_scaled_mm_cpu), + smoothing, adapters, router
    ("qwen2_vl", "rtn", dict(wbits=4, abits=8, symmetric=True), False),
    ("qwen2_vl", "qe", dict(wbits=4, abits=8, symmetric=True, method_params=QE_SMALL), True),
    ("qwen2_vl", "qe", dict(wbits=4, abits=None, method_params=QE_SMALL), True),  # + smoothing, adapters, router
    ("llava", "qe", dict(wbits=3, abits=None, method_params=QE_SMALL), False),  # torch int4pack (3-bit in 4)
    ("qwen3_vl_moe", "rtn", dict(wbits=4, abits=None), False),  # experts in int4pack
    ("qwen3_vl_moe", "qe", dict(wbits=4, abits=None, method_params={**QE_SMALL, "base": "veq"}), True),
])
def test_vllm_bf16_matches_bf16_reference(arch, method, cfg, compiled, quantized_dir, tmp_path):
    """The serving default on CPU is bf16 with vLLM's default compilation (no enforce_eager: the plugin's forward
    is traced; `compiled` runs, dense and MoE, check that, the others run eager to save time). Greedy tokens = the
    fake-quant transformers model run in bf16 (up to near ties), and the quantized layers stay packed: resident
    bytes (measured in the worker through `LLM.apply_model`) at most 40 % of their bf16 size plus the adapters'
    own bf16 bytes (rtn: no adapters, so <= 40 % flat; a dequantized copy would be >= 100 %)."""
    import torch

    ckpt = quantized_dir(arch, method, **cfg)
    reqs = make_requests(ckpt, tmp_path)
    out = run_vllm(ckpt, reqs, tmp_path, dtype="bfloat16", eager=not compiled, resident=True, timeout=1500)
    resident = out.pop()["resident"][0]
    h = run_transformers(load_fake_quant_model(ckpt, dtype=torch.bfloat16), ckpt, reqs)
    assert_greedy_close(out, h, BF16_NEAR_TIE, BF16_LOGPROB_ATOL)
    assert "ReferenceKernel" not in resident["kernels"] and "ReferenceMoEKernel" not in resident["kernels"], resident
    if cfg.get("abits") == 8 and amx_usable():  # the A8 layers run as real int8 x int4
        assert "CPUWNA16LinearKernel(W4A8)" in resident["kernels"], resident
    adapters = _adapter_bf16_bytes(ckpt)
    assert resident["quantized"] <= 0.40 * resident["bf16"] + adapters, (resident, adapters)


def _adapter_bf16_bytes(ckpt) -> int:
    """bf16 bytes of the checkpoint's adapters (routers counted as float32, as served)."""
    from safetensors import safe_open

    from vllm_qe.format import spec

    total = 0
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                suffix = k.rsplit(".", 1)[-1]
                if suffix in (spec.SHARED_A, spec.SHARED_B, spec.ROUTED_A, spec.ROUTED_B, spec.ROUTER):
                    n = st.get_slice(k).get_shape()
                    numel = 1
                    for d in n:
                        numel *= d
                    total += numel * (4 if suffix == spec.ROUTER else 2)
    return total


def _without_tensor(src, name: str, tmp_path):
    """A copy of checkpoint `src` with tensor `name` removed."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    t = load_file(str(bad / "model.safetensors"))
    t.pop(name)
    save_file(t, str(bad / "model.safetensors"))
    return bad


def test_vllm_rejects_missing_tensor_with_its_name(quantized_dir, tmp_path):
    src = quantized_dir("qwen2_vl", "rtn", wbits=4, abits=8)
    bad = _without_tensor(src, "model.layers.1.mlp.down_proj.weight_scale", tmp_path)
    with pytest.raises(RuntimeError, match=r"model\.layers\.1\.mlp\.down_proj\.weight_scale: missing"):
        run_vllm(bad, make_requests(bad, tmp_path, n=1), tmp_path, timeout=300)
    # and an unknown format version
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="unsupported format_version 99"):
        run_vllm(bad, make_requests(bad, tmp_path, n=1), tmp_path, timeout=300)


MOE_QE = dict(wbits=4, abits=None, group_size=16, method_params={**QE_SMALL, "base": "veq"})


@pytest.mark.parametrize("arch, method, cfg, ep", [
    ("qwen2_vl", "rtn", dict(wbits=4, abits=8, group_size=16), False),
    ("qwen2_vl", "qe", dict(wbits=4, abits=6, group_size=16, method_params=QE_SMALL), False),
    # MoE experts shard as vLLM shards them: w1/w3 rows and w2's input (96 -> 2 x 48 = 3 groups of 16 per rank)
    ("qwen3_vl_moe", "qe", MOE_QE, False),
    # ... or, with expert parallelism, whole experts per rank (global -> local expert ids)
    ("qwen3_vl_moe", "qe", MOE_QE, True),
])
def test_tensor_parallel_2_gives_the_same_greedy_tokens(arch, method, cfg, ep, quantized_dir, tmp_path):
    """TP=2 (two CPU workers, gloo) vs TP=1: row-parallel layers all-reduce router scores and activation scales.
    (group 16: the fixture's MLP width 352 splits into 2 x 176 = 11 groups of 16 per rank.)"""
    ckpt = quantized_dir(arch, method, **cfg)
    reqs = make_requests(ckpt, tmp_path)
    tp1 = run_vllm(ckpt, reqs, tmp_path, tp=1)
    tp2 = run_vllm(ckpt, reqs, tmp_path, tp=2, ep=ep)
    assert [r["token_ids"] for r in tp1] == [r["token_ids"] for r in tp2]
    worst = max(abs(a[t] - b[t]) for r1, r2 in zip(tp1, tp2) for a, b in zip(r1["logprobs"], r2["logprobs"])
                for t in a if t in b)
    # Row-parallel partial sums change the float summation order; with activation quantization a 1e-7 change can
    # flip one rounding decision (a whole quantization step for that element), so the bound is looser there.
    # Exactness of the sharded math itself is checked layer by layer in test_vllm_layers.py.
    assert worst < (LOGPROB_ATOL if cfg.get("abits") is None else ACT_QUANT_LOGPROB_ATOL)


def test_vllm_rejects_an_moe_checkpoint_missing_one_expert_tensor(quantized_dir, tmp_path):
    src = quantized_dir("qwen3_vl_moe", "rtn", wbits=4, abits=None)
    bad = _without_tensor(src, "model.language_model.layers.1.mlp.experts.5.up_proj.weight_zero_point", tmp_path)
    with pytest.raises(RuntimeError, match=r"layers\.1\.mlp\.experts\.5\.up_proj\.weight_zero_point: missing"):
        run_vllm(bad, make_requests(bad, tmp_path, n=1), tmp_path, timeout=300)
