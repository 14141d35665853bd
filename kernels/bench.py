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
import contextlib
import platform
import socket
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


@contextlib.contextmanager
def vllm_single_process(device: str):
    """vLLM's parameter classes need a (tensor-parallel) process group and a current config: a one-rank group for
    the benchmark, torn down afterwards when this function created it (so a test process stays clean)."""
    try:
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.distributed import parallel_state as ps
    except Exception:  # noqa: BLE001 - no vLLM: the vLLM columns report it
        yield
        return
    created = not ps.model_parallel_is_initialized()
    with set_current_vllm_config(VllmConfig()):
        if created:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            ps.init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                            distributed_init_method=f"tcp://127.0.0.1:{port}",
                                            backend="nccl" if device == "cuda" else "gloo")
            ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            yield
        finally:
            if created:
                ps.destroy_model_parallel()
                ps.destroy_distributed_environment()


def vllm_mp_kernel(kind: str, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   group: int) -> tuple[Callable[[], object] | None, str]:
    """A vLLM mixed-precision kernel (`kind`: "marlin", "machete" or "choice" = `choose_mp_linear_kernel`'s pick)
    on a 4-bit checkpoint in compressed-tensors layout, as vLLM's WNA16 scheme builds it: `q` `[N, K]` integers,
    `scale` `[N, G]`, `zero` `[N, G]` uint8 or None. Returns (call, kernel name) or (None, why not)."""
    try:
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
        from vllm.model_executor.parameter import (
            BasevLLMParameter,
            GroupQuantScaleParameter,
            PackedvLLMParameter,
        )
        from vllm.scalar_type import scalar_types

        from vllm_qe.format.packing import pack
    except Exception as e:  # noqa: BLE001 - any import problem means "not available here"
        return None, f"vLLM unavailable ({type(e).__name__})"
    n, k = q.shape
    cfg = MPLinearLayerConfig(full_weight_shape=(k, n), partition_weight_shape=(k, n),
                              weight_type=scalar_types.uint4b8 if zero is None else scalar_types.uint4,
                              act_type=x.dtype, group_size=group, zero_points=zero is not None)
    try:
        if kind == "choice":
            cls = choose_mp_linear_kernel(cfg)
        elif kind == "marlin":
            from vllm.model_executor.kernels.linear.mixed_precision.marlin import MarlinLinearKernel as cls
        else:
            from vllm.model_executor.kernels.linear.mixed_precision.machete import MacheteLinearKernel as cls
        ok, why = cls.can_implement(cfg)
        if not ok:
            return None, f"{cls.__name__}: {why}"
        dev = x.device

        def loader(*a, **kw):
            raise RuntimeError("not loadable")

        layer = torch.nn.Module()
        layer.register_parameter("bias", None)
        layer.register_parameter("weight_packed", PackedvLLMParameter(
            data=pack(q, 4).to(dev), input_dim=1, output_dim=0, packed_dim=1, packed_factor=8, weight_loader=loader))
        layer.register_parameter("weight_scale", GroupQuantScaleParameter(
            data=scale.to(dev, x.dtype), input_dim=1, output_dim=0, weight_loader=loader))
        layer.register_parameter("weight_shape", BasevLLMParameter(
            data=torch.tensor([n, k], dtype=torch.int64, device=dev), weight_loader=loader))
        if zero is not None:  # compressed-tensors: int32 [N/8, G], packed along N
            zp = pack(zero.cpu().to(torch.int32).t().contiguous(), 4).t().contiguous()
            layer.register_parameter("weight_zero_point", PackedvLLMParameter(
                data=zp.to(dev), input_dim=1, output_dim=0, packed_dim=0, packed_factor=8, weight_loader=loader))
        kern = cls(cfg, "weight_packed", "weight_scale", "weight_zero_point" if zero is not None else None)
        kern.process_weights_after_loading(layer)
        fn = lambda: kern.apply_weights(layer, x, None)  # noqa: E731
        # same weights as the QE kernels? (w = (q - z)·s; symmetric: z = 8)
        z = torch.full_like(scale, 8.0, dtype=torch.float32) if zero is None else zero.float()
        w = (q.to(dev).float() - z.to(dev).repeat_interleave(group, 1)) * scale.to(dev).float().repeat_interleave(group, 1)
        ref = x.float() @ w.t()
        err = float((fn().float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
        if err > 2e-2:
            return None, f"{cls.__name__}: result differs from the checkpoint's dequantized weights (rel. {err:.2g})"
        return fn, f"{cls.__name__} (rel. error vs dequantized weights {err:.1e})"
    except Exception as e:  # noqa: BLE001 - a kernel that cannot run here is reported, not fatal
        return None, f"{kind}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def bench_shape(n: int, k: int, m: int, device: str, bw: float) -> dict[str, float | None]:
    from vllm_qe.format.packing import pack
    from vllm_qe.kernels.reference import route_grouped, router_scores
    from vllm_qe.kernels.triton.gemm import bytes_moved, kernel_layout, qe_gemm
    from vllm_qe.kernels.triton.qe_linear import qe_linear_packed

    dt = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(m, k, device=device, dtype=dt)
    w = torch.randn(n, k, device=device, dtype=dt) * 0.02
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = pack(q, 4).to(device)
    g = k // GROUP
    scale_ckpt = (torch.rand(n, g, device=device) * 0.01 + 1e-3).half()
    zero_ckpt = torch.randint(0, 16, (n, g), dtype=torch.uint8, device=device)
    scale, zero = kernel_layout(scale_ckpt, zero_ckpt)  # what the runtime does once at load
    sa, sb = torch.randn(RANK_SHARED, k, device=device, dtype=dt), torch.randn(n, RANK_SHARED, device=device, dtype=dt)
    ra = torch.randn(N_ROUTED, RANK_ROUTED, k, device=device, dtype=dt)
    rb = torch.randn(N_ROUTED, n, RANK_ROUTED, device=device, dtype=dt)
    router = torch.rand(N_ROUTED, k, device=device, dtype=dt)

    def with_adapters(act_bits: int):
        ids = route_grouped(router_scores(x, router), 1)
        return qe_linear_packed(x, packed, scale, zero, 4, GROUP, None, None, act_bits, [n], sa, sb, ra, rb, ids)

    row: dict[str, float | str | None] = {
        "qe_w4a16": _time(lambda: qe_gemm(x, packed, scale, zero, 4, GROUP), device),
        "qe_w4a8": _time(lambda: qe_gemm(x, packed, scale, zero, 4, GROUP, act_bits=8), device),
        "qe_w4a16_adapters": _time(lambda: with_adapters(0), device),
        "qe_w4a8_adapters": _time(lambda: with_adapters(8), device),
        "bf16_matmul": _time(lambda: x @ w.t(), device),
    }
    tg = _tinygemm(x, w) if device == "cuda" else None
    row["tinygemm_int4"] = _time(tg, device) if tg else None
    im = _int_mm(x, n) if device == "cuda" else None
    row["int8_int_mm"] = _time(im, device) if im else None
    kinds = ("marlin", "machete") if device == "cuda" else ("choice",)
    for kind in kinds:
        xv = x if device == "cuda" else x.bfloat16()  # vLLM's CPU kernels run bf16 only
        fn, name = vllm_mp_kernel(kind, xv, q, scale_ckpt, zero_ckpt, GROUP)
        row[f"vllm_{kind}"] = _time(fn, device) if fn else None
        row[f"vllm_{kind}_name"] = name
    row["bw_floor"] = bytes_moved(m, n, k, 4, GROUP, 0) / bw  # int4 weights + fp16 scales/u8 zeros + x + y
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["2b", "7b", "72b", "vit"], choices=list(SHAPES))
    p.add_argument("--m", nargs="+", type=int, default=[1, 8, 16, 64, 128, 256, 1024, 2048])
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
        "| model | layer | N x K | M | bf16 ms | QE W4A16 | QE W4A8 | vLLM Marlin | vLLM Machete | QE W4A16+adapters | "
        "QE W4A8+adapters | tinygemm int4 | int8 _int_mm | W4A16 % of BW floor | adapter overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: set[str] = set()
    with vllm_single_process(device):
        _rows(shapes, ms, device, bw, lines, notes)
    lines += ["", "vLLM kernels (name, or why a column is n/a): " + "; ".join(sorted(notes))]
    print(lines[-1])
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


def _rows(shapes: dict, ms: list[int], device: str, bw: float, lines: list[str], notes: set[str]) -> None:
    for model, layers in shapes.items():
        for name, n, k in layers:
            for m in ms:
                r = bench_shape(n, k, m, device, bw)
                base = r["bf16_matmul"]

                def rel(key: str, r=r, base=base) -> str:
                    return "n/a" if r[key] is None else f"{r[key] / base:.2f}x"

                v1, v2 = ("vllm_marlin", "vllm_machete") if device == "cuda" else ("vllm_choice", "vllm_choice")
                notes.update(str(r[f"{v}_name"]) for v in (v1, v2))
                lines.append(
                    f"| {model} | {name} | {n}x{k} | {m} | {base:.4f} | {rel('qe_w4a16')} | {rel('qe_w4a8')} | "
                    f"{rel(v1)} | {rel(v2)} | {rel('qe_w4a16_adapters')} | {rel('qe_w4a8_adapters')} | "
                    f"{rel('tinygemm_int4')} | "
                    f"{rel('int8_int_mm')} | {r['bw_floor'] / r['qe_w4a16']:.0%} | "
                    f"{r['qe_w4a16_adapters'] / r['qe_w4a16'] - 1:+.0%} |")
                print(lines[-1], flush=True)


if __name__ == "__main__":
    sys.exit(main())
