"""Per layer, what a QE checkpoint's adapters do on held-out inputs: each quantized module's relative output error
`‖y_Q(x) − W x‖² / ‖W x‖²` with and without its shared and routed adapters, on the FP model's own inputs to
that module over the peer benchmark's held-out chats (the same inputs for both, so the layer is judged alone, not
through the propagated chain that calibration saw).

    .venv/bin/python benchmarks/adapter_layer_gain.py FIXTURE CKPT [--chats 16]

FIXTURE: a fixture name under runs/peer/fixtures (benchmarks/peer/run.py builds them); CKPT: a vllm-qe checkpoint
calibrated on it (e.g. one of benchmarks/equal_bytes.py's under runs/equal-bytes). Prints one line per module:
shared rank, routed experts, whether it smooths, the error at the checkpoint's activation bits and at A16, each
with and without the adapters, and their ratio (< 1: the adapters help on these inputs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "peer"))

from chats import load_chats  # noqa: E402
from evaluate import log_probs  # noqa: E402

from vllm_qe.calibration.fakequant import FakeQuantLinear, load_fake_quant_model  # noqa: E402
from vllm_qe.kernels import reference  # noqa: E402


def relative_error(y_q: torch.Tensor, y: torch.Tensor) -> float:
    """`‖y_q − y‖² / ‖y‖²` over all tokens and outputs."""
    return float((y_q - y).double().pow(2).sum() / y.double().pow(2).sum())


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fixture")
    p.add_argument("ckpt")
    p.add_argument("--chats", type=int, default=16, help="held-out chats whose tokens are the inputs")
    p.add_argument("--peer-work", default=str(REPO / "runs" / "peer"))
    a = p.parse_args()
    from transformers import AutoModelForImageTextToText

    fixture = Path(a.peer_work) / "fixtures" / a.fixture
    evals = sorted((Path(a.peer_work) / a.fixture).glob("eval-*.safetensors"))
    if not fixture.is_dir() or not evals:
        raise SystemExit(f"{fixture}: run benchmarks/peer/run.py first (it builds the fixtures and eval chats)")
    chats = load_chats(evals[0])[:a.chats]
    fp = AutoModelForImageTextToText.from_pretrained(str(fixture), dtype=torch.float32).eval()
    fq = load_fake_quant_model(a.ckpt)
    quantized = {n: m for n, m in fq.named_modules() if isinstance(m, FakeQuantLinear)}
    fp_modules = dict(fp.named_modules())
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in quantized}
    hooks = [fp_modules[n].register_forward_hook(
        lambda mod, args, out, n=n: inputs[n].append(args[0].reshape(-1, args[0].shape[-1])))
        for n in quantized]
    log_probs(fp, chats)
    for h in hooks:
        h.remove()
    print(f"{'module':48s} {'shared':>6s} {'routed':>6s} smooth | relative error: base, +adapters (ratio), at the act bits | A16")
    for n, m in quantized.items():
        q = m.quantized
        x = torch.cat(inputs[n])
        y = x @ fp_modules[n].weight.float().t()
        ids = None if q.router is None else reference.route(x, q.router)[:, None]
        adapters = dict(shared_a=q.shared_a, shared_b=q.shared_b, routed_a=q.routed_a, routed_b=q.routed_b,
                        expert_ids=ids)
        errs = []
        for bits in (m.act_bits, None):
            base = relative_error(reference.qe_linear(x, m.weight_deq, act_bits=bits, smooth=q.smooth), y)
            full = relative_error(reference.qe_linear(x, m.weight_deq, act_bits=bits, smooth=q.smooth, **adapters), y)
            errs.append(f"{base:.3e}, {full:.3e} ({full / base:.2f})")
        shared = 0 if q.shared_a is None else q.shared_a.shape[0]
        routed = "-" if q.routed_a is None else f"{q.routed_a.shape[0]}x{q.routed_a.shape[1]}"
        print(f"{n:48s} {shared:6d} {routed:>6s} {q.smooth is not None!s:6s} | A{m.act_bits or 16}: {errs[0]} | "
              f"A16: {errs[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
