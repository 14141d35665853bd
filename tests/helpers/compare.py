"""Serving math vs calibration math: vLLM (subprocess) against the transformers fake-quant model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent


def make_requests(ckpt: Path, tmp: Path, n: int = 3) -> list[dict]:
    from transformers import AutoProcessor

    from vllm_qe.calibration.data import chat_messages
    from vllm_qe.testing.vqa import make_sample

    proc = AutoProcessor.from_pretrained(str(ckpt))
    reqs = []
    for i in range(n):
        s = make_sample(11, i, "test")
        path = tmp / f"img{i}.png"
        s.image.save(path)
        prompt = proc.apply_chat_template(chat_messages(s.question), tokenize=False, add_generation_prompt=True)
        reqs.append({"prompt": prompt, "image": str(path)})
    return reqs


def run_vllm(ckpt: Path, reqs: list[dict], tmp: Path, tp: int = 1, max_tokens: int = 6, quant: bool = True,
             timeout: int = 600, ep: bool = False, dtype: str | None = "float32", eager: bool = True,
             resident: bool = False) -> list[dict]:
    """Greedy tokens + top-5 logprobs per request from a vLLM subprocess (`dtype` None: the serving default, bf16
    on CPU; `eager=False`: vLLM's default compilation; `resident`: a last entry `{"resident": [per-worker
    bytes]}`)."""
    req_file, out_file = tmp / "requests.json", tmp / f"vllm_out_tp{tp}{'_ep' if ep else ''}.json"
    req_file.write_text(json.dumps(reqs))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    cmd = [sys.executable, str(HERE / "vllm_generate.py"), str(ckpt), str(req_file), str(out_file),
           "--tp", str(tp), "--max-tokens", str(max_tokens)] + ([] if quant else ["--no-quant"]) + \
        (["--ep"] if ep else []) + (["--dtype", dtype] if dtype else []) + (["--eager"] if eager else []) + \
        (["--resident"] if resident else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"vLLM failed (rc={r.returncode}):\n{r.stderr[-6000:]}")
    return json.loads(out_file.read_text())


@torch.no_grad()
def run_transformers(model, ckpt: Path, reqs: list[dict], max_tokens: int = 6) -> list[dict]:
    """Greedy decoding with full re-forward each step (no KV-cache subtleties) + first-step log-probs."""
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(ckpt))
    out = []
    for r in reqs:
        inputs = dict(proc(text=[r["prompt"]], images=[Image.open(r["image"]).convert("RGB")], return_tensors="pt"))
        ids = inputs["input_ids"]
        toks, logprobs = [], []
        for _ in range(max_tokens):
            inputs["input_ids"] = ids
            inputs["attention_mask"] = torch.ones_like(ids)
            if "mm_token_type_ids" in inputs:
                inputs["mm_token_type_ids"] = torch.nn.functional.pad(
                    inputs["mm_token_type_ids"], (0, ids.shape[1] - inputs["mm_token_type_ids"].shape[1]))
            lp = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
            t = int(lp.argmax())
            toks.append(t)
            logprobs.append(lp)
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
        out.append({"token_ids": toks, "logprobs": logprobs})
    return out


def assert_same(vllm_out: list[dict], hf_out: list[dict], atol: float) -> float:
    """Same greedy tokens, and every reported top-5 logprob within `atol`; returns the worst difference."""
    worst = 0.0
    for v, h in zip(vllm_out, hf_out):
        assert v["token_ids"] == h["token_ids"], f"greedy tokens differ: vLLM {v['token_ids']} vs HF {h['token_ids']}"
        for step_v, lp_h in zip(v["logprobs"], h["logprobs"]):
            for tok, lp in step_v.items():
                worst = max(worst, abs(lp - float(lp_h[int(tok)])))
    assert worst < atol, f"logprobs differ by {worst:.2e} (tolerance {atol})"
    return worst


def assert_greedy_close(vllm_out: list[dict], ref_out: list[dict], max_gap: float, lp_atol: float) -> dict:
    """Greedy decoding in reduced precision (bf16): each request's tokens equal the reference's until a step where
    the reference itself is a near tie (its logprob for vLLM's token within `max_gap` of its own choice); there
    the two sequences may part and the rest is not compared. On compared steps every reported top-5 logprob is
    within `lp_atol`. Returns {"steps": compared steps, "parted": requests that parted at a near tie, "worst"}."""
    steps, parted, worst = 0, 0, 0.0
    for v, h in zip(vllm_out, ref_out):
        for i, (tv, th) in enumerate(zip(v["token_ids"], h["token_ids"])):
            lp_h = h["logprobs"][i]
            if tv != th:
                gap = float(lp_h[th] - lp_h[tv])
                assert gap <= max_gap, (f"step {i}: vLLM picked {tv}, the reference {th} with a logprob gap of "
                                        f"{gap:.3f} (> {max_gap}): vLLM {v['token_ids']} vs {h['token_ids']}")
                parted += 1
                break
            steps += 1
            for tok, lp in v["logprobs"][i].items():
                worst = max(worst, abs(lp - float(lp_h[int(tok)])))
    assert worst <= lp_atol, f"logprobs differ by {worst:.3f} (tolerance {lp_atol})"
    assert steps >= len(vllm_out), f"only {steps} steps compared"
    return {"steps": steps, "parted": parted, "worst": worst}
