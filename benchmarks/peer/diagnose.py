"""Why do two GPTQ checkpoints of one (fixture, setting, calibration seed) differ end to end? (project venv)

    .venv/bin/python benchmarks/peer/diagnose.py FIXTURE SETTING SEED [--work runs/peer] [--num-eval 24]

Reads the checkpoints a run.py run left under WORK (vllm-qe's `vllm-qe/<setting>-<tag>-seed<S>`, llm-compressor's
`llmc/<setting>-seed<S>`) and prints, for the two tools:
1. per quantized module, the relative H-weighted weight error tr(dW H dW^T) / tr(W H W^T) with H = X^T X of the
   FP model's inputs to that module, once over the calibration dump of that seed, once over the held-out chats;
2. the share of weights that sit on a different grid level (|W_vllm-qe - W_llmc| > half of llm-compressor's step);
3. the held-out KL of hybrids: llm-compressor's weights everywhere except one decoder layer, or one module type,
   taken from vllm-qe's checkpoint;
4. where the KL sits: its mean over image-placeholder positions and over text positions.
Everything is dequantized by evaluate.py's readers and substituted into the FP fixture, as in the benchmark.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chats import load_chats  # noqa: E402
from evaluate import log_probs, read_checkpoint, substituted_model, tail, text_positions  # noqa: E402


def input_grams(model, modules: set[str], chats: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{module: X^T X} (float64 [in, in]) of each module's inputs over every position of `chats`."""
    grams: dict[str, torch.Tensor] = {}

    def hook_for(key: str):
        def hook(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[key] = grams.get(key, 0) + x.T @ x
        return hook

    hooks = [m.register_forward_pre_hook(hook_for(tail(n))) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and "visual" not in n and tail(n) in modules]
    with torch.no_grad():
        for c in chats:
            model(**c)
    for h in hooks:
        h.remove()
    return grams


def rel_error(w_q: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    d = w_q.double() - w
    return float(torch.trace(d @ h @ d.T) / torch.trace(w @ h @ w.T))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fixture")
    p.add_argument("setting")
    p.add_argument("seed", type=int)
    p.add_argument("--work", default=str(Path(__file__).resolve().parents[2] / "runs" / "peer"))
    p.add_argument("--num-eval", type=int, default=24, help="held-out chats scored (the first N of the dump)")
    a = p.parse_args()
    from transformers import AutoModelForImageTextToText

    work = Path(a.work)
    fdir, fwork = work / "fixtures" / a.fixture, work / a.fixture
    q_dirs = sorted((fwork / "vllm-qe").glob(f"{a.setting}-*-seed{a.seed}"))
    q_dirs = [d for d in q_dirs if d.is_dir()]
    l_dir = fwork / "llmc" / f"{a.setting}-seed{a.seed}"
    if len(q_dirs) != 1 or not l_dir.is_dir():
        raise SystemExit(f"{fwork}: expected one vllm-qe/{a.setting}-*-seed{a.seed} and llmc/{a.setting}-seed{a.seed}"
                         f" checkpoint, found {[d.name for d in q_dirs]} and {l_dir.is_dir()}")
    _, wq_raw, _, _ = read_checkpoint(q_dirs[0])
    _, wl_raw, _, _ = read_checkpoint(l_dir)
    wq = {tail(k): v for k, v in wq_raw.items()}
    wl = {tail(k): v for k, v in wl_raw.items()}
    if wq.keys() != wl.keys():
        raise SystemExit(f"the checkpoints quantize different modules: {sorted(wq.keys() ^ wl.keys())[:4]}")
    full_name = {tail(k): k for k in wl_raw}
    order = sorted(wq, key=lambda t: (int(t.split(".")[1]), t))
    print(f"{a.fixture} {a.setting} seed {a.seed}: vllm-qe {q_dirs[0].name} vs llm-compressor {l_dir.name}")

    fp = AutoModelForImageTextToText.from_pretrained(str(fdir), dtype=torch.float32).eval()
    w_fp = {tail(n): m.weight.detach().double() for n, m in fp.named_modules()
            if isinstance(m, torch.nn.Linear) and tail(n) in wq}
    calib = load_chats(fwork / f"calib-builtin-vqa-n32-seed{a.seed}.safetensors")
    evals = load_chats(next(fwork.glob("eval-test-seed7-n*.safetensors")))[: a.num_eval]
    h_cal, h_ev = input_grams(fp, set(wq), calib), input_grams(fp, set(wq), evals)
    scales: dict[str, torch.Tensor] = {}
    for f in l_dir.glob("*.safetensors"):
        if f.name.startswith("peer_"):
            continue
        scales.update({tail(k[: -len(".weight_scale")]): v.float() for k, v in load_file(str(f)).items()
                       if k.endswith(".weight_scale")})

    print("\n1./2. relative H-weighted error, vllm-qe / llm-compressor (ratio), and weights on another grid level")
    print(f"{'module':28s} {'H of calibration chats':>30s} {'H of held-out chats':>30s} {'other level':>12s}")
    n_all = n_diff = 0
    for t in order:
        a1, b1 = rel_error(wq[t], w_fp[t], h_cal[t]), rel_error(wl[t], w_fp[t], h_cal[t])
        a2, b2 = rel_error(wq[t], w_fp[t], h_ev[t]), rel_error(wl[t], w_fp[t], h_ev[t])
        step = scales[t].repeat_interleave(wq[t].shape[1] // scales[t].shape[1], 1)
        other = (wq[t] - wl[t]).abs() > 0.5 * step
        n_all, n_diff = n_all + other.numel(), n_diff + int(other.sum())
        print(f"{t:28s} {a1:.2e} / {b1:.2e} ({a1 / b1:4.2f}) {a2:.2e} / {b2:.2e} ({a2 / b2:4.2f}) "
              f"{float(other.float().mean()):11.1%}")
    print(f"all modules: {n_diff / n_all:.1%} of the weights on another grid level")

    lp_fp = log_probs(fp, evals)
    text = text_positions(fdir, evals)

    def kl_of(from_q) -> tuple[float, float, float]:
        """(KL over every position, over image positions, over text positions) of the hybrid."""
        model = substituted_model(fdir, {full_name[t]: (wq[t] if from_q(t) else wl[t]) for t in wq})
        lp_q = log_probs(model, evals)
        per_pos = torch.cat([(x.exp() * (x - y)).sum(-1) for x, y in zip(lp_fp, lp_q)])
        m = torch.cat(text)
        return float(per_pos.mean()), float(per_pos[~m].mean()), float(per_pos[m].mean())

    print(f"\n3./4. held-out KL (first {len(evals)} chats) of hybrids: llm-compressor's weights except the named "
          "part, taken from vllm-qe")
    print(f"{'hybrid':36s} {'all positions':>14s} {'image positions':>16s} {'text positions':>15s}")
    rows = [("llm-compressor everywhere", lambda t: False), ("vllm-qe everywhere", lambda t: True)]
    rows += [(f"vllm-qe layer {n}", lambda t, n=n: t.split(".")[1] == n)
             for n in sorted({t.split(".")[1] for t in wq}, key=int)]
    rows += [(f"vllm-qe {kind}", lambda t, kind=kind: t.split(".", 2)[2] == kind)
             for kind in sorted({t.split(".", 2)[2] for t in wq})]
    for name, from_q in rows:
        k_all, k_img, k_txt = kl_of(from_q)
        print(f"{name:36s} {k_all:14.3g} {k_img:16.3g} {k_txt:15.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
