"""The main job end to end: tiny local VLM -> calibrate -> checkpoint -> vLLM OpenAI server -> image question.

    python examples/demo.py [--model trained|random] [--arch qwen2_vl|qwen3_vl_moe|...] [--method qe] [--wbits 4]
                            [--abits 8] [--method-params JSON] [--workdir runs/demo]

`trained` (default): the tiny Qwen2-VL trained here on the generated VQA task (trained once, 17 min in the recorded run on
2 cores, then reused from runs/vqa-qwen2vl), so the answer means something. `random`: a random-init tiny model of
`--arch` (seconds; the answer is noise). `--method-params`: the method's parameters as `vllm-qe calibrate` takes them;
the default `{}` is the product default (QE: adapters from a 0.25 bits-per-weight budget, a shared expert on layers
this narrow); `'{"k": 8, "num_routed": 4, "shared_rank": 4, "routed_rank": 4}'` forces routed experts (about twice
the bytes of W4 on this model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--model", default="trained", choices=["trained", "random"])
    p.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl", "llava", "qwen3_vl_moe"],
                   help="trained models: qwen2_vl (default) and qwen3_vl_moe (MoE experts weight-only)")
    p.add_argument("--method", default="qe")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=int, default=8)
    p.add_argument("--method-params", default="{}", help="JSON, as `vllm-qe calibrate --method-params`")
    p.add_argument("--port", type=int, default=8765)
    a = p.parse_args()
    try:
        params = json.loads(a.method_params)
    except json.JSONDecodeError as e:
        p.error(f"--method-params is not JSON: {e}")

    import openai

    from vllm_qe.calibration.api import CalibrationConfig, calibrate
    from vllm_qe.client import image_data_url, image_message, wait_ready
    from vllm_qe.format.checkpoint import inspect_checkpoint
    from vllm_qe.serving import server_command, server_env
    from vllm_qe.testing.tiny_models import build_tiny_model
    from vllm_qe.testing.vqa import make_sample

    work = Path(a.workdir)
    if a.model == "trained":
        from vllm_qe.testing.train_vqa import train_vqa_model

        if a.arch not in ("qwen2_vl", "qwen3_vl_moe"):
            p.error("--model trained exists for --arch qwen2_vl and qwen3_vl_moe; use --model random for the others")
        model_dir = Path("runs/vqa-qwen3vlmoe" if a.arch == "qwen3_vl_moe" else "runs/vqa-qwen2vl")
        if not (model_dir / "config.json").exists():
            print(f"[1/4] training the tiny {a.arch} on the generated VQA task -> {model_dir} (once)")
            train_vqa_model(model_dir, arch=a.arch)
        else:
            print(f"[1/4] reusing the trained tiny {a.arch} in {model_dir}")
    else:
        model_dir = work / f"tiny-{a.arch}"
        print(f"[1/4] building a random-init tiny {a.arch} in {model_dir}")
        build_tiny_model(a.arch, model_dir)
    ckpt_dir = work / f"{model_dir.name}-{a.method}-w{a.wbits}a{a.abits}"
    print(f"[2/4] calibrating ({a.method}, W{a.wbits}A{a.abits}) -> {ckpt_dir}")
    calibrate(model_dir, ckpt_dir, CalibrationConfig(method=a.method, wbits=a.wbits, abits=a.abits,
                                                     group_size=32 if a.abits is None else -1,
                                                     symmetric=a.abits is not None, num_samples=32,
                                                     method_params=params), overwrite=True)
    print("\n".join(inspect_checkpoint(ckpt_dir).lines()))
    print(f"[3/4] starting the vLLM OpenAI server on 127.0.0.1:{a.port}")
    with open(work / "server.log", "w") as log:
        proc = subprocess.Popen(server_command(str(ckpt_dir), port=a.port, served_name="vllm-qe-demo"), stdout=log,
                                stderr=subprocess.STDOUT, env=server_env())
    try:
        base = f"http://127.0.0.1:{a.port}"
        wait_ready(base, proc)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        print("[4/4] asking image questions through the OpenAI client")
        for i in range(5):
            s = make_sample(2026, i, "test")
            r = client.chat.completions.create(model="vllm-qe-demo", max_tokens=8, temperature=0,
                                               messages=image_message(s.question, image_data_url(s.image)))
            print(f"  {s.question:28s} expected {s.answer!r:10s} answer {r.choices[0].message.content!r}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
