"""Run vLLM offline on a checkpoint and dump greedy tokens + top logprobs as JSON (used by the tests).

usage: python vllm_generate.py CKPT REQUESTS.json OUT.json [--tp N] [--ep] [--dtype D] [--eager] [--resident]
REQUESTS.json: [{"prompt": str, "image": path}, ...]
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import argparse

    from PIL import Image
    from vllm import LLM, SamplingParams

    from vllm_qe.serving import engine_kwargs

    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("requests")
    p.add_argument("out")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=6)
    p.add_argument("--no-quant", action="store_true")
    p.add_argument("--ep", action="store_true", help="expert parallelism over the TP ranks (MoE)")
    p.add_argument("--dtype", default=None, help="engine dtype (default: vllm_qe.serving's, bf16 on CPU)")
    p.add_argument("--eager", action="store_true", help="enforce_eager (skip vLLM's compilation)")
    p.add_argument("--resident", action="store_true",
                   help="also report resident bytes of the quantized layers (LLM.apply_model)")
    a = p.parse_args()
    with open(a.requests) as f:
        reqs = json.load(f)
    kw = engine_kwargs(a.ckpt, tensor_parallel_size=a.tp)
    if a.dtype:
        kw["dtype"] = a.dtype
    if a.eager:
        kw["enforce_eager"] = True
    if a.ep:
        kw["enable_expert_parallel"] = True
    if a.no_quant:
        kw.pop("quantization")
    if a.tp > 1:
        kw["gpu_memory_utilization"] = 0.5
    if a.resident:  # apply_model ships a function to the workers
        import os

        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    llm = LLM(**kw)
    inputs = [{"prompt": r["prompt"], "multi_modal_data": {"image": Image.open(r["image"]).convert("RGB")}}
              for r in reqs]
    outs = llm.generate(inputs, SamplingParams(max_tokens=a.max_tokens, temperature=0.0, logprobs=5))
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append({
            "token_ids": list(c.token_ids), "text": c.text,
            "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in c.logprobs],
        })
    if a.resident:
        from vllm_qe.runtime.memory import quantized_layer_bytes

        result.append({"resident": llm.apply_model(quantized_layer_bytes)})
    with open(a.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
