"""Offline `LLM.generate` on a vllm-qe checkpoint: a batch of image questions.

    python examples/offline_generate.py CKPT_DIR [--dtype float32]

On CPU it serves in bf16 by default (`vllm_qe.serving.engine_kwargs`: the packed int4 kernels are bf16 kernels)
under vLLM's default compilation; `--dtype float32` is the exact-math path.
"""

from __future__ import annotations

import argparse


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_qe.serving import engine_kwargs
    from vllm_qe.testing.vqa import make_sample

    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--dtype", default=None, help="engine dtype (default: bf16 on CPU)")
    a = p.parse_args()
    llm = LLM(**engine_kwargs(a.ckpt, **({"dtype": a.dtype} if a.dtype else {})))
    samples = [make_sample(2026, i, "test") for i in range(5)]
    messages = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": s.image},
                                              {"type": "text", "text": s.question}]}] for s in samples]
    outs = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0))
    for s, o in zip(samples, outs):
        print(f"{s.question:30s} expected {s.answer!r:10s} got {o.outputs[0].text!r}")


if __name__ == "__main__":  # vLLM spawns workers that re-import __main__
    main()
