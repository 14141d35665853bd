"""Kernel benchmark: the QE linear kernels vs what a user would pick instead, as ratios in one run.

    python -m vllm_qe.kernels.bench [--models 2b 7b 72b] [--m 1 8 16 64 256 2048] [--out docs/benchmarks/h100.md]

Per shape (linear layers of Qwen2-VL-2B/7B/72B, language model and vision tower) and M it times:
QE W4A16 GEMM alone, QE W4A16 + shared + routed adapters (router included), QE W4A8 (+adapters), torch bf16
`matmul` (cuBLAS), PyTorch's int4 weight-only tinygemm (`aten._weight_int4pack_mm`) and int8 `torch._int_mm`
where they run, and the memory-bandwidth floor of the W4A16 GEMM (bytes moved / measured device copy bandwidth).
Needs CUDA. `--smoke` runs one tiny shape through the same table code on any device (CI checks the script).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable

import torch

# (name, N out, K in) per model; vision tower (same ViT for all three sizes) listed once as "vit".
SHAPES: dict[str, list[tuple[str, int, int]]] = {
    "2b": [("qkv", 2048, 1536), ("o", 1536, 1536), ("gate_up", 17920, 1536), ("down", 1536, 8960)],
    "7b": [("qkv", 4608, 3584), ("o", 3584, 3584), ("gate_up", 37888, 3584), ("down", 3584, 18944)],
    "72b": [("qkv", 10240, 8192), ("o", 8192, 8192), ("gate_up", 59136, 8192), ("down", 8192, 29568)],
    "vit": [("qkv", 3840, 1280), ("proj", 1280, 1280), ("fc1", 5120, 1280), ("fc2", 1280, 5120)],
}
RANK_SHARED, N_ROUTED, RANK_ROUTED, GROUP = 32, 8, 32, 128


def _time(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    import time

    fn()
    t = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        t.append((time.perf_counter() - t0) * 1e3)
    return sorted(t)[1]


def copy_bandwidth(device: str) -> float:
    """Measured device-to-device copy bandwidth, bytes/ms (read + write counted)."""
    n = 256 * 2**20 if device == "cuda" else 16 * 2**20
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = _time(lambda: b.copy_(a), device)
    return 2 * n / ms


def _tinygemm(x: torch.Tensor, w: torch.Tensor) -> Callable[[], object] | None:
    """PyTorch's int4 weight-only GEMM, if this build has it for the device (its API moved across releases)."""
    try:
        n, k = w.shape
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=w.device)
        packed_u8 = (q[:, 1::2] << 4 | q[:, ::2]).to(torch.uint8)
        wp = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.randn(k // GROUP, n, 2, dtype=torch.bfloat16, device=w.device)
        fn = lambda: torch.ops.aten._weight_int4pack_mm(x, wp, GROUP, sz)  # noqa: E731
        fn()
        return fn
    except Exception:
        return None


def _int_mm(x: torch.Tensor, n: int) -> Callable[[], object] | None:
    try:
        m, k = x.shape
        if m <= 16:
            return None  # torch._int_mm needs M > 16
        xi = torch.randint(-8, 8, (m, k), dtype=torch.int8, device=x.device)
        wi = torch.randint(-8, 8, (k, n), dtype=torch.int8, device=x.device)
        fn = lambda: torch._int_mm(xi, wi)  # noqa: E731
        fn()
        return fn
    except Exception:
        return None


def bench_shape(n: int, k: int, m: int, device: str, bw: float) -> dict[str, float | None]:
    from vllm_qe.format.packing import pack
    from vllm_qe.kernels.reference import route_grouped, router_scores
    from vllm_qe.kernels.triton.gemm import qe_gemm
    from vllm_qe.kernels.triton.qe_linear import qe_linear_packed

    dt = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(m, k, device=device, dtype=dt)
    w = torch.randn(n, k, device=device, dtype=dt) * 0.02
    packed = pack(torch.randint(0, 16, (n, k), dtype=torch.int32), 4).to(device)
    g = k // GROUP
    scale = (torch.rand(n, g, device=device) * 0.01 + 1e-3).half()
    zero = torch.randint(0, 16, (n, g), dtype=torch.uint8, device=device)
    sa, sb = torch.randn(RANK_SHARED, k, device=device, dtype=dt), torch.randn(n, RANK_SHARED, device=device, dtype=dt)
    ra = torch.randn(N_ROUTED, RANK_ROUTED, k, device=device, dtype=dt)
    rb = torch.randn(N_ROUTED, n, RANK_ROUTED, device=device, dtype=dt)
    router = torch.rand(N_ROUTED, k, device=device, dtype=dt)

    def with_adapters(act_bits: int):
        ids = route_grouped(router_scores(x, router), 1)
        return qe_linear_packed(x, packed, scale, zero, 4, GROUP, None, None, act_bits, [n], sa, sb, ra, rb, ids)

    row: dict[str, float | None] = {
        "qe_w4a16": _time(lambda: qe_gemm(x, packed, scale, zero, 4, GROUP), device),
        "qe_w4a16_adapters": _time(lambda: with_adapters(0), device),
        "qe_w4a8_adapters": _time(lambda: with_adapters(8), device),
        "bf16_matmul": _time(lambda: x @ w.t(), device),
    }
    tg = _tinygemm(x, w) if device == "cuda" else None
    row["tinygemm_int4"] = _time(tg, device) if tg else None
    im = _int_mm(x, n) if device == "cuda" else None
    row["int8_int_mm"] = _time(im, device) if im else None
    bytes_moved = n * k // 2 + n * g * 3 + m * k * 2 + m * n * 2  # int4 weights + fp16 scales/u8 zeros + x + y
    row["bw_floor"] = bytes_moved / bw
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["2b", "7b", "72b", "vit"], choices=list(SHAPES))
    p.add_argument("--m", nargs="+", type=int, default=[1, 8, 16, 64, 256, 2048])
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--smoke", action="store_true", help="one tiny shape on any device (checks the script)")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.smoke:
        print("the kernel benchmark needs a CUDA GPU (use --smoke to check the script on CPU)", file=sys.stderr)
        return 2
    shapes = {"smoke": [("tiny", 64, 256)]} if a.smoke else {m: SHAPES[m] for m in a.models}
    ms = [1, 17] if a.smoke else a.m
    import triton

    bw = copy_bandwidth(device)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    lines = [
        f"device: {dev_name}; torch {torch.__version__}; triton {triton.__version__}; "
        f"copy bandwidth {bw * 1e3 / 1e9:.0f} GB/s",
        f"command: python -m vllm_qe.kernels.bench {' '.join(argv or sys.argv[1:])}",
        f"adapters: shared rank {RANK_SHARED} + {N_ROUTED} routed experts of rank {RANK_ROUTED} (router included); "
        f"weights W4 group {GROUP} asymmetric. Cells: time relative to bf16 matmul (<1 is faster) and, for the "
        "W4A16 GEMM, the share of the bandwidth floor reached.",
        "",
        "| model | layer | N x K | M | bf16 ms | QE W4A16 | QE W4A16+adapters | QE W4A8+adapters | tinygemm int4 | "
        "int8 _int_mm | W4A16 % of BW floor | adapter overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, layers in shapes.items():
        for name, n, k in layers:
            for m in ms:
                r = bench_shape(n, k, m, device, bw)
                base = r["bf16_matmul"]

                def rel(key: str, r=r, base=base) -> str:
                    return "n/a" if r[key] is None else f"{r[key] / base:.2f}x"

                lines.append(
                    f"| {model} | {name} | {n}x{k} | {m} | {base:.4f} | {rel('qe_w4a16')} | "
                    f"{rel('qe_w4a16_adapters')} | {rel('qe_w4a8_adapters')} | {rel('tinygemm_int4')} | "
                    f"{rel('int8_int_mm')} | {r['bw_floor'] / r['qe_w4a16']:.0%} | "
                    f"{r['qe_w4a16_adapters'] / r['qe_w4a16'] - 1:+.0%} |")
                print(lines[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
