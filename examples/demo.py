"""The main job end to end: tiny local VLM -> calibrate -> checkpoint -> vLLM OpenAI server -> image question.

    python examples/demo.py [--workdir runs/demo] [--arch qwen2_vl] [--method rtn] [--wbits 4] [--abits 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl", "llava"])
    p.add_argument("--method", default="rtn")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=int, default=8)
    p.add_argument("--port", type=int, default=8765)
    a = p.parse_args()

    import openai

    from vllm_qe.calibration.api import CalibrationConfig, calibrate
    from vllm_qe.calibration.fixtures.tiny_models import build_tiny_model
    from vllm_qe.calibration.fixtures.vqa import make_sample
    from vllm_qe.client import image_data_url, image_message, wait_ready
    from vllm_qe.format.checkpoint import inspect_checkpoint
    from vllm_qe.serving import server_command, server_env

    work = Path(a.workdir)
    model_dir = work / f"tiny-{a.arch}"
    ckpt_dir = work / f"tiny-{a.arch}-{a.method}-w{a.wbits}a{a.abits}"
    print(f"[1/4] building tiny {a.arch} in {model_dir}")
    build_tiny_model(a.arch, model_dir)
    print(f"[2/4] calibrating ({a.method}, W{a.wbits}A{a.abits}) -> {ckpt_dir}")
    calibrate(model_dir, ckpt_dir, CalibrationConfig(method=a.method, wbits=a.wbits, abits=a.abits, group_size=32,
                                                     num_samples=16), overwrite=True)
    print("\n".join(inspect_checkpoint(ckpt_dir).lines()))
    print(f"[3/4] starting the vLLM OpenAI server on 127.0.0.1:{a.port}")
    with open(work / "server.log", "w") as log:
        proc = subprocess.Popen(server_command(str(ckpt_dir), port=a.port, served_name="vllm-qe-demo"), stdout=log,
                                stderr=subprocess.STDOUT, env=server_env())
    try:
        base = f"http://127.0.0.1:{a.port}"
        wait_ready(base, proc)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        s = make_sample(2026, 1, "test")
        print(f"[4/4] asking: {s.question!r} about a generated image (expected answer: {s.answer!r})")
        r = client.chat.completions.create(model="vllm-qe-demo", max_tokens=8, temperature=0,
                                           messages=image_message(s.question, image_data_url(s.image)))
        print(f"answer: {r.choices[0].message.content!r}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
