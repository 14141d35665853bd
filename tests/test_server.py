"""The OpenAI-compatible server on 127.0.0.1 with the official `openai` client: images, errors, recovery."""

from __future__ import annotations

import socket
import subprocess

import pytest

from vllm_qe.client import image_data_url, image_message, wait_ready
from vllm_qe.serving import server_command, server_env

pytestmark = pytest.mark.vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(quantized_dir, tmp_path_factory):
    ckpt = quantized_dir("qwen2_vl", "rtn", wbits=4, abits=8)
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(server_command(str(ckpt), port=port, served_name="tiny"), stdout=fh,
                                stderr=subprocess.STDOUT, env=server_env())
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        yield base
    except Exception:
        raise RuntimeError(f"server failed; log tail:\n{log.read_text()[-4000:]}") from None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_image_chat_errors_and_recovery(server):
    import openai

    from vllm_qe.testing.vqa import make_sample

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", timeout=60, max_retries=0)
    s = make_sample(3, 0, "test")
    r = client.chat.completions.create(model="tiny", messages=image_message(s.question, image_data_url(s.image)),
                                       max_tokens=5, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    assert r.usage.prompt_tokens > 16  # the image expanded into its tokens

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=image_message("What?", "data:image/png;base64,bm90IGFuIGltYWdl"), max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=image_message("red " * 3000, image_data_url(s.image)), max_tokens=3)

    # still serving, and deterministic under greedy decoding
    r2 = client.chat.completions.create(model="tiny", messages=image_message(s.question, image_data_url(s.image)),
                                        max_tokens=5, temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content
