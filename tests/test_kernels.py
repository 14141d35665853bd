"""Triton kernels under TRITON_INTERPRET=1 (CPU) or on CUDA, against the torch reference."""

from __future__ import annotations

import os

import pytest
import torch

from vllm_qe.format.packing import pack
from vllm_qe.format.quantizer import compute_qparams, dequantize, quantize
from vllm_qe.kernels import reference

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from vllm_qe.format.quantizer import fake_quantize_activation  # noqa: E402
from vllm_qe.kernels.triton import gemm, launcher  # noqa: E402
from vllm_qe.kernels.triton.gemm import qe_gemm  # noqa: E402
from vllm_qe.kernels.triton.int8_reference import qe_gemm_int8_reference, quantize_activations_reference  # noqa: E402
from vllm_qe.kernels.triton.lora import align_tokens, lowrank_add_, max_padded_rows  # noqa: E402
from vllm_qe.kernels.triton.qe_linear import qe_linear_packed  # noqa: E402


def _quantized(n, k, bits, gs, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qp = compute_qparams(w, bits, gs, sym)
    q = quantize(w, qp)
    zero = None if sym else qp.zero.to(torch.uint8)
    return (pack(q, bits).to(DEVICE), qp.scale.half().to(DEVICE), None if zero is None else zero.to(DEVICE),
            dequantize(q, qp.scale, qp.zero, gs).to(DEVICE))


@pytest.mark.parametrize("bits, gs, sym", [(4, 32, False), (4, -1, True), (3, 32, False), (8, 64, True),
                                           (2, 32, False)])
@pytest.mark.parametrize("m, k", [(1, 64), (7, 96), (33, 100)])
@pytest.mark.parametrize("act_bits", [0, 8, 6])
def test_gemm_matches_reference(bits, gs, sym, m, k, act_bits):
    if k % 32 and gs == 64:
        pytest.skip("ragged K covered by the group-32 cases")
    n = 48
    packed, scale, zero, w_deq = _quantized(n, k, bits, gs, sym, seed=m + k)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(m, k, generator=g) * 2).to(DEVICE)
    smooth = (torch.rand(k, generator=g) + 0.5).to(DEVICE)
    got = qe_gemm(x, packed, scale, zero, bits, gs, smooth=smooth, act_bits=act_bits, block=(16, 32, 32))
    want = reference.qe_linear(x, w_deq, act_bits=act_bits or None, smooth=smooth)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-4)


def test_align_tokens_groups_by_expert_with_padding():
    ids = torch.tensor([2, 0, 2, 2, 0, 3])
    sorted_ids, bexp, npad = align_tokens(ids, num_experts=4, block_m=2)
    # expert 0: tokens 1,4; expert 1: none; expert 2: 0,2,3 (+pad); expert 3: 5 (+pad); then the fixed-size tail
    assert int(npad) == 8
    assert sorted_ids.numel() == max_padded_rows(6, 4, 2) == 6 + 4 * (2 - 1)
    assert bexp.numel() == 5
    assert bexp[:4].tolist() == [0, 2, 2, 3]
    assert sorted_ids.tolist() == [1, 4, 0, 2, 3, 6, 5, 6, 6, 6]


@pytest.mark.parametrize("m, e, block_m", [(1, 8, 16), (37, 5, 4), (64, 3, 16), (9, 1, 16)])
def test_align_tokens_matches_host_grouping(m, e, block_m):
    """Device-side alignment = the obvious host grouping (stable order per expert, runs padded to block_m)."""
    g = torch.Generator().manual_seed(m * e)
    ids = torch.randint(0, max(1, e - 1), (m,), generator=g)  # the last expert (if e > 1) stays empty
    sorted_ids, bexp, npad = align_tokens(ids.to(DEVICE), e, block_m)
    want_rows, want_blocks = [], []
    for ex in range(e):
        rows = [i for i in range(m) if int(ids[i]) == ex]
        pad = -len(rows) % block_m
        want_rows += rows + [m] * pad
        want_blocks += [ex] * ((len(rows) + pad) // block_m)
    n = int(npad)
    assert n == len(want_rows)
    assert sorted_ids.numel() == max_padded_rows(m, e, block_m) >= n
    assert sorted_ids[:n].tolist() == want_rows and (sorted_ids[n:] == m).all()
    assert bexp[: n // block_m].tolist() == want_blocks
    assert ((bexp >= 0) & (bexp < e)).all()


@pytest.mark.parametrize("m", [1, 5, 40])
def test_routed_lowrank_with_empty_experts(m):
    g = torch.Generator().manual_seed(m)
    k, n, r, e = 80, 56, 8, 6
    x = torch.randn(m, k, generator=g).to(DEVICE)
    a = torch.randn(e, r, k, generator=g).to(DEVICE)
    b = torch.randn(e, n, r, generator=g).to(DEVICE)
    ids = torch.randint(0, 3, (m,), generator=g).to(DEVICE)  # experts 3..5 get no tokens
    y = torch.zeros(m, n, device=DEVICE)
    lowrank_add_(y, x, a, b, ids)
    torch.testing.assert_close(y, reference.routed_lowrank(x, a, b, ids), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act_bits", [0, 8])
def test_full_qe_linear_with_fused_modules(act_bits):
    """Two fused modules (q/k style), shared + routed experts, bias, smoothing, ragged M."""
    g = torch.Generator().manual_seed(3)
    k, splits, m = 64, [32, 16], 9
    parts = [_quantized(o, k, 4, 32, False, seed=i) for i, o in enumerate(splits)]
    packed = torch.cat([p[0] for p in parts])
    scale = torch.cat([p[1] for p in parts])
    zero = torch.cat([p[2] for p in parts])
    w_deq = torch.cat([p[3] for p in parts])
    n, r, e = sum(splits), 4, 3
    x = torch.randn(m, k, generator=g).to(DEVICE)
    sa, sb = torch.randn(2 * r, k, generator=g).to(DEVICE), torch.randn(n, r, generator=g).to(DEVICE)
    ra, rb = torch.randn(2 * e, r, k, generator=g).to(DEVICE), torch.randn(e, n, r, generator=g).to(DEVICE)
    router = torch.rand(2 * e, k, generator=g).to(DEVICE)
    ids = reference.route_grouped(reference.router_scores(x, router), 2)
    bias = torch.randn(n, generator=g).to(DEVICE)
    smooth = (torch.rand(k, generator=g) + 0.5).to(DEVICE)
    got = qe_linear_packed(x, packed, scale, zero, 4, 32, bias, smooth, act_bits, splits, sa, sb, ra, rb, ids,
                           block=(16, 32, 32))
    want = reference.qe_linear(x, w_deq, bias, act_bits=act_bits or None, smooth=smooth, out_splits=splits,
                               shared_a=sa, shared_b=sb, routed_a=ra, routed_b=rb, expert_ids=ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("bits, sym", [(4, False), (3, False), (8, True)])
@pytest.mark.parametrize("m, split_k, swap_ab", [(1, 3, True), (5, 1, True), (5, 2, False), (20, 1, False)])
def test_gemm_split_k_and_swap_ab(bits, sym, m, split_k, swap_ab):
    """Split-K (atomic partial sums, ragged last split) and the transposed `yᵀ = W·xᵀ` tile = the reference."""
    k, n, gs = 160, 40, 32
    packed, scale, zero, w_deq = _quantized(n, k, bits, gs, sym, seed=bits + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    got = qe_gemm(x, packed, scale, zero, bits, gs, block=(16, 32, 32), split_k=split_k, swap_ab=swap_ab)
    torch.testing.assert_close(got, reference.qe_linear(x, w_deq).float(), rtol=1e-5, atol=1e-4)


def test_gemm_n_major_scale_layout():
    """`kernel_layout` (unit-stride N for vectorized scale loads) gives the same result as the checkpoint layout."""
    packed, scale, zero, w_deq = _quantized(40, 96, 4, 32, False, seed=5)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    s_n, z_n = gemm.kernel_layout(scale, zero)
    assert s_n.stride(0) == 1 and z_n.stride(0) == 1 and torch.equal(s_n, scale) and torch.equal(z_n, zero)
    got = qe_gemm(x, packed, s_n, z_n, 4, 32, block=(16, 32, 32), act_bits=8)
    torch.testing.assert_close(got, qe_gemm(x, packed, scale, zero, 4, 32, block=(16, 32, 32), act_bits=8))
    torch.testing.assert_close(qe_gemm(x, packed, s_n, z_n, 4, 32, block=(16, 32, 32)),
                               reference.qe_linear(x, w_deq).float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act_bits", [8, 6, 4])
def test_quantize_activations_is_bit_exact(act_bits):
    """The int8 prologue kernel gives exactly the integer grid of `fake_quantize_activation` (ties to even, smoothing,
    a given absmax, an all-zero row)."""
    g = torch.Generator().manual_seed(act_bits)
    x = torch.randn(5, 70, generator=g) * 3
    x[2] = 0.0
    qmax = 2 ** (act_bits - 1) - 1
    x[3] = 0.0
    x[3, :6] = torch.tensor([qmax, 0.5, 1.5, 2.5, -2.5, -0.5])  # scale 1: exact ties, rounded to even
    smooth = torch.rand(70, generator=g) + 0.5
    smooth[:6] = 1.0
    for absmax in (None, (x / smooth).abs().amax(-1, keepdim=True) * 1.5):
        xq, xs = gemm.quantize_activations(x.to(DEVICE), act_bits, smooth.to(DEVICE),
                                           None if absmax is None else absmax.to(DEVICE))
        want_q, want_s = quantize_activations_reference(x, act_bits, smooth, absmax)
        assert torch.equal(xq.cpu(), want_q) and torch.equal(xs.cpu(), want_s)
        if absmax is None:
            assert xq[3, 1:6].tolist() == [0, 2, 2, -2, 0] and xs[2] == 1e-12 and not xq[2].any()
        fq = fake_quantize_activation(x / smooth, act_bits, absmax)
        torch.testing.assert_close(xq.cpu().float() * xs.cpu()[:, None], fq, rtol=0, atol=0)


@pytest.mark.parametrize("bits, gs, sym", [(4, 32, False), (3, 64, False), (8, 32, False), (8, -1, True),
                                           (4, -1, False)])
@pytest.mark.parametrize("m, k, act_bits, split_k", [(1, 96, 8, 2), (19, 130, 8, 1), (6, 64, 4, 1)])
def test_gemm_int8_path_is_integer_exact(bits, gs, sym, m, k, act_bits, split_k):
    """W<b>A8 runs int8 x int8 -> int32 dots (zero-point correction, group-then-scale epilogue): equal to the exact
    integer twin up to float32 epilogue rounding, and to the float32 reference up to its own rounding."""
    n = 40
    packed, scale, zero, w_deq = _quantized(n, k, bits, gs, sym, seed=bits * k + m)
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=g) * 2).to(DEVICE)
    smooth = (torch.rand(k, generator=g) + 0.5).to(DEVICE)
    assert gemm.plan(m, n, k, bits, gs, act_bits, tile=gemm.GemmTile(16, 32, 32, 4, 2)).int8
    got = qe_gemm(x, packed, scale, zero, bits, gs, smooth=smooth, act_bits=act_bits, block=(16, 32, 32),
                  split_k=split_k, swap_ab=m == 1)
    exact = qe_gemm_int8_reference(x, packed, scale, zero, bits, gs, act_bits, smooth)
    torch.testing.assert_close(got, exact, rtol=2e-6, atol=1e-6)
    want = reference.qe_linear(x, w_deq, act_bits=act_bits, smooth=smooth).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_plan_split_k_and_paths():
    """Launch planning from shapes alone: split-K fills the GPU at M=1 (not at M=2048), every split gets K tiles,
    a K tile never straddles a group on the per-tile path, int8 only where that holds."""
    sms = 132
    lp = gemm.plan(1, 4096, 4096, 4, 128, 0, sms)
    gm, gn, sk = lp.grid(1, 4096)
    assert gm * gn == 64 and sk > 1 and gm * gn * sk >= sms
    k_tiles = -(-4096 // lp.block_k)
    assert (sk - 1) * -(-k_tiles // sk) < k_tiles  # no empty split
    assert gemm.plan(2048, 4096, 4096, 4, 128, 0, sms).split_k == 1
    assert gemm.plan(16, 37888, 3584, 4, 128, 0, sms).split_k == 1  # N alone fills the GPU
    for bits, gs in ((4, 32), (4, 64), (3, 96), (4, 128), (8, -1)):
        lp = gemm.plan(16, 1024, 3072, bits, gs, 8, sms)
        assert lp.per_tile_groups and (gs == -1 or gs % lp.block_k == 0) and lp.int8
    lp = gemm.plan(16, 1024, 3072, 3, 16, 8, sms)
    assert not lp.per_tile_groups and not lp.int8 and lp.block_k % 32 == 0
    assert not gemm.plan(16, 1024, 3072, 4, 24, 8, sms).int8  # 24 = 8·3: no 32-wide tile inside a group


def test_cuda_path_python_is_graph_safe(monkeypatch):
    """The Python of the CUDA path (routing, device-side alignment, launch planning, output allocation, adapter
    and MoE bookkeeping) traces as one graph with `torch.compile(fullgraph=True)`: no `.item()`, `.cpu()`,
    data-dependent shapes or host syncs. The kernel launches are replaced by a no-op here (CPU tensors)."""
    launches = []
    monkeypatch.setattr(launcher, "launch", lambda kernel, grid, *a, **kw: launches.append(kernel))
    from vllm_qe.kernels.triton.moe import fused_moe_qe

    g = torch.Generator().manual_seed(0)
    t, k, n, r, e = 7, 64, 48, 4, 3
    packed, scale, zero, _ = _quantized(n, k, 4, 32, False)
    router = torch.rand(2 * e, k, generator=g)
    sa, sb = torch.randn(2 * r, k, generator=g), torch.randn(n, r, generator=g)
    ra, rb = torch.randn(2 * e, r, k, generator=g), torch.randn(e, n, r, generator=g)

    def layer(x):
        ids = reference.route_grouped(reference.router_scores(x, router), 2)
        return qe_linear_packed(x, packed.cpu(), scale.cpu(), zero.cpu(), 4, 32, None, None, 8, [32, 16], sa, sb,
                                ra, rb, ids)

    w13 = _expert_weights(4, 2 * 32, k, 4, 32, seed=1)
    w2 = _expert_weights(4, k, 32, 4, 32, seed=2)

    def moe(x, topk_ids, topk_w):
        return fused_moe_qe(x, tuple(a.cpu() for a in w13[:3]), tuple(a.cpu() for a in w2[:3]), 4, 32, topk_ids,
                            topk_w, (torch.randn(4, r, k), torch.randn(4, 64, r)), None)

    x = torch.randn(t, k, generator=g)
    torch.compile(layer, fullgraph=True, backend="eager")(x)
    torch.compile(moe, fullgraph=True, backend="eager")(x, torch.randint(0, 4, (t, 2), generator=g),
                                                        torch.rand(t, 2, generator=g))
    compiled_align = torch.compile(align_tokens, fullgraph=True, backend="eager")
    ids = torch.randint(0, 5, (33,), generator=g)
    for got, want in zip(compiled_align(ids, 6, 4), align_tokens(ids, 6, 4)):
        assert torch.equal(got, want)
    assert len(launches) >= 8  # quantize + GEMM + 2x(shrink, expand) + MoE GEMMs and adapters were reached


def test_bench_script_smoke(capsys):
    """The benchmark's table code runs (figures on CPU/interpreter are meaningless and never quoted)."""
    os.environ["VLLM_QE_FORCE_TRITON"] = "1"
    try:
        from vllm_qe.kernels import bench

        assert bench.main(["--smoke"]) == 0
    finally:
        os.environ.pop("VLLM_QE_FORCE_TRITON")
    out = capsys.readouterr().out
    assert out.count("| smoke | tiny | 64x256 |") == 2
    assert "vLLM kernels (name, or why a column is n/a):" in out


def _expert_weights(e, n, k, bits, gs, seed):
    parts = [_quantized(n, k, bits, gs, False, seed=seed + i) for i in range(e)]
    return (torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts]),
            torch.stack([p[3] for p in parts]))


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("t, topk", [(1, 2), (9, 2), (20, 1)])
@pytest.mark.parametrize("with_adapters", [False, True])
def test_fused_moe_matches_reference(bits, t, topk, with_adapters):
    from vllm_qe.kernels.triton.moe import fused_moe_qe

    e, h, inter, r = 6, 64, 48, 4
    g = torch.Generator().manual_seed(t * 10 + topk)
    w13 = _expert_weights(e, 2 * inter, h, bits, 32, seed=100)
    w2 = _expert_weights(e, h, inter, bits, 16, seed=200)
    x = torch.randn(t, h, generator=g).to(DEVICE)
    # only experts 0..3 are ever chosen: 4 and 5 have no tokens
    ids = torch.stack([torch.randperm(4, generator=g)[:topk] for _ in range(t)]).to(DEVICE)
    wts = torch.softmax(torch.randn(t, topk, generator=g), -1).to(DEVICE)
    ad13 = ad2 = None
    if with_adapters:
        ad13 = (torch.randn(e, r, h, generator=g).to(DEVICE) * 0.1, torch.randn(e, 2 * inter, r, generator=g).to(DEVICE) * 0.1)
        ad2 = (torch.randn(e, r, inter, generator=g).to(DEVICE) * 0.1, torch.randn(e, h, r, generator=g).to(DEVICE) * 0.1)
    got = fused_moe_qe(x, w13[:3], w2[:3], bits, (32, 16), ids, wts, ad13, ad2)
    want = reference.fused_moe(x, w13[3], w2[3], ids, wts, ad13, ad2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)



def test_fused_moe_prefill_block_64_matches_reference():
    """The prefill alignment block (64 rows, plain-orientation tile) and its adapters = the reference."""
    from vllm_qe.kernels.triton.moe import fused_moe_qe, moe_block_m

    assert moe_block_m(16, 8) == 16 and moe_block_m(64 * 8, 8) == 64
    e, h, inter, r, t, topk = 3, 64, 48, 4, 40, 2
    g = torch.Generator().manual_seed(64)
    w13 = _expert_weights(e, 2 * inter, h, 4, 32, seed=500)
    w2 = _expert_weights(e, h, inter, 4, 16, seed=600)
    x = torch.randn(t, h, generator=g).to(DEVICE)
    ids = torch.stack([torch.randperm(e, generator=g)[:topk] for _ in range(t)]).to(DEVICE)
    wts = torch.softmax(torch.randn(t, topk, generator=g), -1).to(DEVICE)
    ad13 = (torch.randn(e, r, h, generator=g).to(DEVICE) * 0.1, torch.randn(e, 2 * inter, r, generator=g).to(DEVICE) * 0.1)
    got = fused_moe_qe(x, w13[:3], w2[:3], 4, (32, 16), ids, wts, ad13, None, block_m=64)
    want = reference.fused_moe(x, w13[3], w2[3], ids, wts, ad13, None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 3])
def test_fused_moe_packed_op_with_smoothing_triton_equals_cpu_oracle(bits, monkeypatch):
    """The plugin's MoE op: the Triton path (per-expert smoothing, shared adapters, top-2, idle experts) equals the
    op's dequantize-then-reference path."""
    from vllm_qe.kernels import packed as ops

    e, h, inter, r, t, topk = 5, 64, 32, 4, 11, 2
    g = torch.Generator().manual_seed(bits)
    w13 = _expert_weights(e, 2 * inter, h, bits, 32, seed=300)
    w2 = _expert_weights(e, h, inter, bits, 32, seed=400)
    x = torch.randn(t, h, generator=g).to(DEVICE)
    ids = torch.stack([torch.randperm(3, generator=g)[:topk] for _ in range(t)]).to(DEVICE)  # 3, 4 idle
    wts = torch.softmax(torch.randn(t, topk, generator=g), -1).to(DEVICE)
    ad = [torch.randn(e, 2 * r, h, generator=g) * 0.1, torch.randn(e, 2 * inter, 2 * r, generator=g) * 0.1,
          torch.randn(e, r, inter, generator=g) * 0.1, torch.randn(e, h, r, generator=g) * 0.1]
    s13, s2 = torch.rand(e, h, generator=g) + 0.5, torch.rand(e, inter, generator=g) + 0.5
    args = (x, *w13[:3], *w2[:3], bits, 32, ids, wts, *[a.to(DEVICE) for a in ad], s13.to(DEVICE), s2.to(DEVICE))
    monkeypatch.setenv("VLLM_QE_FORCE_TRITON", "0")
    want = ops.qe_fused_moe_packed(*args) if not x.is_cuda else None
    monkeypatch.setenv("VLLM_QE_FORCE_TRITON", "1")
    got = ops.qe_fused_moe_packed(*args)
    if want is None:  # on CUDA the op always takes the Triton path: compare with the reference directly
        w13d = torch.stack([w13[3][i] / s13[i].to(DEVICE) for i in range(e)])
        w2d = torch.stack([w2[3][i] / s2[i].to(DEVICE) for i in range(e)])
        want = reference.fused_moe(x, w13d, w2d, ids, wts, tuple(a.to(DEVICE) for a in ad[:2]),
                                   tuple(a.to(DEVICE) for a in ad[2:]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
