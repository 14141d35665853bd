"""vLLM's QE linear method vs FakeQuantLinear at the layer level, through the real weight loaders, at TP=1 and
TP=2 (torchrun + gloo on CPU): QKV, merged gate/up (column-parallel) and down (row-parallel) layers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
HELPER = Path(__file__).parent / "helpers" / "layer_check.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(opts: dict, tp: int) -> list[dict]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    if opts.get("cpu_kernel"):
        env["VLLM_QE_CPU_KERNEL"] = opts["cpu_kernel"]
    if tp == 1:
        cmd = [sys.executable, str(HELPER), json.dumps(opts)]
        env.update(RANK="0", WORLD_SIZE="1", MASTER_PORT=str(_port()))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}", f"--master-port={_port()}",
               str(HELPER), json.dumps(opts)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert {row["layer"] for row in rows} == {"qkv_proj", "gate_up_proj", "down_proj"}
    return rows


@pytest.mark.parametrize("opts", [
    {"wbits": 4, "abits": 8},
    {"wbits": 3, "abits": None, "qe": True},
    {"wbits": 4, "abits": 6, "qe": True},
])
@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_linear_method_matches_reference(opts, tp):
    """float32: torch's int4 GEMM keeps the weights packed and dequantizes exactly (`(q-8)·s + (8-z)·s` is exact in
    float32), so only the summation order differs from the reference (GEMM blocking, adapters, TP partial sums)."""
    for row in _run(opts, tp):
        assert row["kernel"] == "Int4PackCPUKernel", row
        tol = (1e-6 if tp == 1 else 1e-5) * row["ref_scale"]
        assert row["max_abs_err"] <= tol, row


@pytest.mark.parametrize("opts, tp, kernel", [
    ({"wbits": 4, "abits": None, "qe": True}, 1, "Int4PackCPUKernel"),  # the CPU default (no AMX here)
    ({"wbits": 4, "abits": None, "qe": True, "cpu_kernel": "vllm"}, 1, "CPUWNA16LinearKernel"),  # vLLM's own
    ({"wbits": 4, "abits": 8, "cpu_kernel": "vllm"}, 2, "CPUWNA16LinearKernel"),  # ... sharded, act quant
    ({"wbits": 3, "abits": None, "qe": True}, 1, "Int4PackCPUKernel"),  # no vLLM kernel for 3-bit
])
def test_vllm_linear_method_bf16(opts, tp, kernel):
    """bf16 activations (the CPU serving default): torch's int4 GEMM, or vLLM's CPUWNA16 when asked
    (`VLLM_QE_CPU_KERNEL=vllm`; the default without AMX is torch's, see runtime/kernels.py); within bf16 rounding of the float32 reference (scales, inputs and outputs are rounded to bf16: a
    wrong grid or zero point would be off by whole quantization steps, i.e. tens of percent)."""
    for row in _run({**opts, "dtype": "bfloat16"}, tp):
        assert row["kernel"] == kernel, row
        assert row["max_abs_err"] <= 2e-2 * row["ref_scale"], row
