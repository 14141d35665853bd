"""CPU prefill on packed int4 weights (kernels/int4pack_cpu.py `int4pack_mm`): torch's int4 GEMM for few tokens,
dequantize (from torch's int4pack bytes) + dense GEMM for many. Both branches against the checkpoint's own
dequantized math, below and above the crossover; the branch lives inside one opaque op (graph-safe)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.packed import random_packed_layer
from vllm_qe.format.module import dequantize_packed
from vllm_qe.kernels.base import KernelTarget, QELayerSpec
from vllm_qe.kernels.int4pack_cpu import (
    INT4_DEQUANT_MIN_TOKENS,
    Int4PackCPUKernel,
    int4pack,
    int4pack_dequantize,
    int4pack_group,
    int4pack_layout,
    int4pack_mm,
)


def _layer(bits: int, symmetric: bool, group: int, out_f: int, in_f: int, dtype: torch.dtype, seed: int = 0):
    """A random checkpoint layer in torch's int4 layout: (w4, sz, group', reference weight `[out, in]` float32,
    the largest magnitude torch's `(q - 8)·s + o` form handles per weight, `[out, in]`: `8·s + |w|`)."""
    packed, scale, zero = random_packed_layer(bits, symmetric, group, out_f, in_f, seed)
    c = QELayerSpec.build(in_f, out_f, in_f, out_f, bits, group, symmetric, 0, dtype)
    w4, sz = int4pack(packed, scale, zero, c)
    w = dequantize_packed(packed, scale, zero, bits, group, in_f)
    per_weight = scale.float().repeat_interleave(in_f if group == -1 else group, dim=1)[:, :in_f]
    reach = 8 * per_weight + w.abs()
    return w4, sz, int4pack_group(c), w, reach


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, reach: torch.Tensor, dtype: torch.dtype) -> None:
    """`y` = `x·wᵀ` within rounding: float32 to 1e-6 of `|x|·reachᵀ`, half types to 2^-7 of it (the offset
    `(8 - z)·s`, weights and outputs are rounded to 8 mantissa bits, so a weight is known to ~2^-9 of
    `8·s + |w|`; a wrong nibble, row or group would be off by whole quantization steps)."""
    ref = x.float() @ w.t()
    bound = x.float().abs() @ reach.t()
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    err = (y.float() - ref).abs()
    assert y.dtype == dtype and y.shape == ref.shape
    assert (err <= tol * bound + 1e-6).all(), (err / bound).max().item()


def test_the_int4pack_layout_is_known_here():
    """The dequantizing branch needs torch's nibble layout; on x86 with AVX512 / AVX2 (every machine here) it is
    one of the known ones (else the int4 GEMM runs at every size: correct, slow prefill)."""
    assert int4pack_layout() in ((64, "halves"), (32, "halves"), (32, "pairs"))


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (3, True), (3, False), (2, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_both_branches_equal_the_reference(bits, symmetric, dtype):
    # 208 output rows = 3 whole blocks of 64 + a partial block of 16 (torch packs that one differently)
    w4, sz, group, w, reach = _layer(bits, symmetric, 64, 208, 256, dtype, seed=bits)
    for tokens in (1, 7, INT4_DEQUANT_MIN_TOKENS - 1, INT4_DEQUANT_MIN_TOKENS, 3 * INT4_DEQUANT_MIN_TOKENS + 5):
        x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        for min_tokens in (10**9, 1):  # int4 GEMM, dequantize + GEMM
            _check(int4pack_mm(x, w4, group, sz, min_tokens=min_tokens), x, w, reach, dtype)
        _check(torch.ops.vllm_qe.int4pack_linear(x, w4, group, sz), x, w, reach, dtype)  # the default rule


@pytest.mark.parametrize("out_f, in_f, group", [(8960, 1536, 128), (1536, 8960, 128), (80, 128, -1)])
def test_dequantize_in_chunks_equals_the_checkpoint_grid(out_f, in_f, group):
    """float32 scales: dequantizing any column range of the int4pack bytes is bit-exact (`(q-8)·s + (8-z)·s`);
    chunked at the served widths (2B MLP), across block and partial-block boundaries, per-channel groups."""
    w4, sz, g, w, _ = _layer(4, False, group, out_f, in_f, torch.float32)
    layout = int4pack_layout()
    block = layout[0]
    for n0, n1 in ((0, out_f), (block, min(out_f, 5 * block)), (out_f // block * block - block, out_f)):
        assert torch.equal(int4pack_dequantize(w4, sz, g, n0, n1, layout), w[n0:n1].t())


def test_int4pack_kernel_is_one_opaque_op_under_dynamic_compile():
    """The token-count branch must not specialize vLLM's compiled graph: under `torch.compile(dynamic=True,
    fullgraph=True)` the layer's GEMM traces into one `vllm_qe::int4pack_linear` call, and the compiled function
    serves token counts on both sides of the crossover without recompiling."""
    from torch._dynamo.testing import CompileCounterWithBackend

    w4, sz, group, w, reach = _layer(4, True, 128, 192, 256, torch.bfloat16)
    c = QELayerSpec.build(256, 192, 256, 192, 4, 128, True, 0, torch.bfloat16)
    assert Int4PackCPUKernel.can_implement(c, KernelTarget("cpu"))[0]
    kernel = Int4PackCPUKernel(c)
    layer = torch.nn.Module()
    layer.qe_w4, layer.qe_w4_sz, layer.qe_w4_group = w4, sz, group

    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    counter = CompileCounterWithBackend(backend)
    fn = torch.compile(lambda x: kernel.apply(layer, x), backend=counter, dynamic=True, fullgraph=True)
    for tokens in (3, INT4_DEQUANT_MIN_TOKENS + 9, 5, 2 * INT4_DEQUANT_MIN_TOKENS):
        x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(tokens)).bfloat16()
        _check(fn(x), x, w, reach, torch.bfloat16)
    assert counter.frame_count == 1, counter.frame_count
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum(t.startswith("vllm_qe.int4pack_linear") for t in targets) == 1, targets
    assert not any("_weight_int4pack_mm" in t for t in targets), targets


@pytest.mark.parametrize("splits, shared_rank, num_experts", [
    ([96, 32, 32], 4, 4),  # qkv: unequal modules
    ([80, 80], 0, 3),  # gate/up, routed only
    ([64], 2, 0),  # shared only
])
def test_packed_adapters_equal_the_per_module_math(splits, shared_rank, num_experts):
    """The served adapter form (one shrink for all modules and kinds, one expand per module) = per module
    `x·A_sᵀ·B_sᵀ + x·A_eᵀ·B_eᵀ` with `e` the token's expert (float32: to summation order)."""
    from vllm_qe.kernels.adapters import adapter_delta, pack_adapters

    g = torch.Generator().manual_seed(len(splits))
    n, k, rr, T, out = len(splits), 48, 3, 7, sum(splits)
    sa = torch.randn(n * shared_rank, k, generator=g) if shared_rank else None
    sb = torch.randn(out, shared_rank, generator=g) if shared_rank else None
    ra = torch.randn(n * num_experts * rr, k, generator=g) if num_experts else None
    rb = torch.randn(out, num_experts * rr, generator=g) if num_experts else None
    ids = torch.randint(0, max(num_experts, 1), (T, n), generator=g)
    x = torch.randn(T, k, generator=g)
    want = torch.zeros(T, out)
    o0 = 0
    for m, width in enumerate(splits):
        cols = slice(o0, o0 + width)
        if shared_rank:
            want[:, cols] += x @ sa[m * shared_rank:(m + 1) * shared_rank].t() @ sb[cols].t()
        for t in range(T):
            if num_experts:
                e = m * num_experts + int(ids[t, m])
                want[t, cols] += x[t] @ ra[e * rr:(e + 1) * rr].t() @ rb[cols, (e % num_experts) * rr:][:, :rr].t()
        o0 += width
    a, b = pack_adapters(splits, sa, sb, ra, rb)
    assert a.shape == (n * (shared_rank + num_experts * rr), k) and b.shape == (out, shared_rank + num_experts * rr)
    got = adapter_delta(x, splits, a, b, ids if num_experts else None, shared_rank, num_experts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 300])
def test_router_scores_in_token_chunks_equal_the_reference(tokens):
    """The served router (`vllm_qe::router_scores`, chunked over tokens) = `reference.router_scores` bit for bit,
    so routing decisions are the calibration's."""
    from vllm_qe.kernels import reference
    from vllm_qe.kernels.adapters import ROUTER_CHUNK_TOKENS

    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 96, generator=g).bfloat16()
    router = torch.rand(8, 96, generator=g).half().float()
    got = torch.ops.vllm_qe.router_scores(x, router)
    assert tokens <= ROUTER_CHUNK_TOKENS or got.shape[0] > ROUTER_CHUNK_TOKENS
    assert torch.equal(got, reference.router_scores(x, router))
