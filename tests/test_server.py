"""The OpenAI-compatible server (`vllm_qe.serving.server_command`: vLLM's api_server through `vllm_qe.server`) on
127.0.0.1 with the official `openai` client: images, concurrent valid and malformed requests, errors, recovery.
One server start for the module (vLLM starts in 30-90 s here)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from vllm_qe.client import image_data_url, image_message, wait_ready
from vllm_qe.serving import FETCH_TIMEOUT_S, server_command, server_env

FETCH_SLACK_S = 4.0  # scheduling slack on a loaded 2-core machine, on top of the configured fetch timeout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_command_never_repeats_a_flag():
    cmd = server_command("CKPT", port=8000, served_name="tiny",
                         extra=["--port", "9001", "--max_model_len=99", "-q", "other", "--dtype", "float32",
                                "--middleware", "a.b", "--enforce-eager"])
    assert cmd[1:3] == ["-m", "vllm_qe.server"]
    flags = [t.split("=")[0].replace("_", "-") for t in cmd[3:] if t.startswith("-")]
    flags = ["--quantization" if f == "-q" else f for f in flags]
    assert len(flags) == len(set(flags)), cmd
    after = {cmd[i]: cmd[i + 1] for i in range(3, len(cmd) - 1) if cmd[i].startswith("-")}
    assert after["--port"] == "9001" and after["--dtype"] == "float32" and after["-q"] == "other"
    assert "--max_model_len=99" in cmd and "--max-model-len" not in cmd and "--quantization" not in cmd
    assert after["--model"] == "CKPT" and after["--served-model-name"] == "tiny" and after["--host"] == "127.0.0.1"


def test_cli_serve_port_after_dir(monkeypatch):
    """`vllm-qe serve DIR --port N` (the port lands in argparse's REMAINDER) gives one `--port N`."""
    from vllm_qe import cli

    seen = {}
    monkeypatch.setattr(cli.os, "execvpe", lambda file, cmd, env: seen.update(cmd=cmd, env=env))
    monkeypatch.delenv("VLLM_IMAGE_FETCH_TIMEOUT", raising=False)
    monkeypatch.delenv("VLLM_MEDIA_FETCH_MAX_RETRIES", raising=False)
    cli.main(["serve", "CKPT", "--port", "9002", "--max-model-len", "77"])
    cmd = seen["cmd"]
    assert cmd.count("--port") == 1 and cmd[cmd.index("--port") + 1] == "9002", cmd
    assert cmd.count("--max-model-len") == 1 and cmd[cmd.index("--max-model-len") + 1] == "77", cmd
    assert seen["env"]["VLLM_IMAGE_FETCH_TIMEOUT"] == str(FETCH_TIMEOUT_S)
    assert seen["env"]["VLLM_MEDIA_FETCH_MAX_RETRIES"] == "1"
    cli.main(["serve", "CKPT", "--fetch-timeout", "3"])
    assert seen["env"]["VLLM_IMAGE_FETCH_TIMEOUT"] == "3" and "--fetch-timeout" not in seen["cmd"]
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "7")  # the user's environment wins over the default
    cli.main(["serve", "CKPT"])
    assert seen["env"]["VLLM_IMAGE_FETCH_TIMEOUT"] == "7"


def test_lone_surrogate_middleware():
    """The ASGI middleware answers 400 naming the field for a lone surrogate; other bodies (a valid pair too) reach
    the app unchanged."""
    import asyncio

    from vllm_qe.server import RejectLoneSurrogates, lone_surrogate

    assert lone_surrogate({"messages": [{"content": "a\ud800"}]}) == "messages[0].content"
    assert lone_surrogate(json.loads('{"messages": [{"content": "\\ud83d\\ude00"}]}')) is None  # a valid pair

    async def app(scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    def post(chunks: list[bytes]) -> tuple[int, bytes]:
        sent = []
        queue = [{"type": "http.request", "body": c, "more_body": i + 1 < len(chunks)} for i, c in enumerate(chunks)]

        async def receive():
            return queue.pop(0)

        async def send(m):
            sent.append(m)

        asyncio.run(RejectLoneSurrogates(app)({"type": "http", "method": "POST"}, receive, send))
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    ok = b'{"messages": [{"content": "smile \\ud83d\\ude00"}]}'
    assert post([ok[:10], ok[10:]]) == (200, ok)
    assert post([b"not json \\ud800"]) == (200, b"not json \\ud800")
    status, body = post([b'{"messages": [{"role": "user", ', b'"content": "hi \\udc00"}]}'])
    assert status == 400 and "messages[0].content" in json.loads(body)["error"]["message"]


@pytest.mark.vllm
def test_media_fetch_failures_are_client_errors(monkeypatch, black_hole):
    """Through vLLM's own MediaConnector: a never-answering host fails within the fetch timeout and a closed port
    at once, both as VLLMUnprocessableEntityError (422) naming the URL; file:// without an allowed path and a
    non-base64 data URL as ValueError (400)."""
    import asyncio

    from vllm.connections import HTTPConnection
    from vllm.exceptions import VLLMUnprocessableEntityError
    from vllm.multimodal.media.connector import MediaConnector

    from vllm_qe.server import install

    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "1")
    monkeypatch.setenv("VLLM_MEDIA_FETCH_MAX_RETRIES", "1")
    install()
    install()  # idempotent
    closed = f"http://127.0.0.1:{_free_port()}/closed.png"

    async def fetch(url: str) -> tuple[BaseException | None, float]:
        connection = HTTPConnection()
        t = time.perf_counter()
        try:
            await MediaConnector(connection=connection).fetch_image_async(url)
        except Exception as e:  # noqa: BLE001 - the exception is the result
            return e, time.perf_counter() - t
        finally:
            if connection._async_client is not None:
                await connection._async_client.close()
        return None, time.perf_counter() - t

    for url, why in ((black_hole, "timeout"), (closed, "connect")):
        err, seconds = asyncio.run(fetch(url))
        assert isinstance(err, VLLMUnprocessableEntityError), repr(err)
        assert url in str(err) and why in str(err), str(err)
        assert seconds < 1 + FETCH_SLACK_S, seconds
    err, _ = asyncio.run(fetch("data:image/png,abc"))
    assert isinstance(err, ValueError) and "base64" in str(err), repr(err)
    err, _ = asyncio.run(fetch("data:image/png;base64,@@not*base64!!"))
    assert isinstance(err, ValueError) and "data URL 'data:image/png;base64,@@" in str(err), repr(err)
    with pytest.raises(ValueError, match="allowed-local-media-path"):
        MediaConnector().fetch_image("file:///etc/hostname")


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    log: object

    def alive(self) -> bool:
        return self.proc.poll() is None


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
        wait_ready(base, proc, timeout=420)
        yield Server(base, proc, log)
    except Exception:
        raise RuntimeError(f"server failed; log tail:\n{log.read_text()[-4000:]}") from None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def black_hole():
    """`http://127.0.0.1:PORT/...` of a TCP server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/dead.png"
    stop.set()
    t.join(timeout=5)
    for c in held:
        c.close()
    sock.close()


@pytest.mark.vllm
def test_image_chat_errors_and_recovery(server):
    import openai

    from vllm_qe.testing.vqa import make_sample

    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", timeout=60, max_retries=0)
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


@dataclass
class Outcome:
    status: int
    message: str
    seconds: float
    content: str | None = None


def _call(client, **request) -> Outcome:
    import openai

    t = time.perf_counter()
    try:
        r = client.chat.completions.create(**request)
        return Outcome(200, "", time.perf_counter() - t, r.choices[0].message.content)
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        message = body.get("message") or (body.get("error") or {}).get("message") or str(e)
        return Outcome(e.status_code, message, time.perf_counter() - t)


@pytest.mark.vllm
def test_concurrent_valid_and_malformed_requests(server, black_hole):
    """12 valid image requests with 10 malformed ones mixed in, all at once: each valid one answered (equal to its
    sequential answer, greedy), each malformed one a 4xx naming the problem, dead media URLs failing within the
    configured fetch timeout, no 5xx, the server alive afterwards."""
    import httpx
    import openai

    from vllm_qe.testing.vqa import make_sample

    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", timeout=120, max_retries=0)
    closed = f"http://127.0.0.1:{_free_port()}/closed.png"  # nothing listens there: connection refused
    good = [make_sample(11, i, "test") for i in range(12)]
    img = image_data_url(good[0].image)
    valid = {f"valid{i}": dict(model="tiny", messages=image_message(s.question, image_data_url(s.image)),
                               max_tokens=6, temperature=0) for i, s in enumerate(good)}

    def bad(url: str, text: str = "What is shown?", model: str = "tiny") -> dict:
        return dict(model=model, messages=image_message(text, url), max_tokens=3, temperature=0)

    two_images = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                               {"type": "image_url", "image_url": {"url": img}},
                                               {"type": "text", "text": "Compare."}]}]
    # name -> (request, expected status, words the message must contain)
    malformed = {
        "bad_base64": (bad("data:image/png;base64,@@not*base64!!"), 400, ["data url", "base64"]),
        "not_an_image": (bad("data:image/png;base64,bm90IGFuIGltYWdl"), 400, ["image"]),
        "long_prompt": (bad(img, "red " * 3000), 400, ["1024"]),
        "dead_url": (bad(black_hole), 422, [black_hole, "timeout"]),
        "closed_port": (bad(closed), 422, [closed, "connect"]),
        "file_url": (bad("file:///etc/hostname"), 400, ["allowed-local-media-path"]),
        "data_not_base64": (bad("data:image/png,abc"), 400, ["base64"]),
        "unknown_model": (bad(img, model="no-such-model"), 404, ["no-such-model"]),
        "too_many_images": (dict(model="tiny", messages=two_images, max_tokens=3), 400, ["image"]),
    }
    surrogate_body = (b'{"model": "tiny", "max_tokens": 3, "messages": '
                      b'[{"role": "user", "content": "hi \\ud800 there"}]}')

    def raw_surrogate() -> Outcome:
        t = time.perf_counter()
        r = httpx.post(f"{server.base}/v1/chat/completions", content=surrogate_body,
                       headers={"content-type": "application/json"}, timeout=120)
        return Outcome(r.status_code, r.json()["error"]["message"], time.perf_counter() - t)

    names = list(valid) + list(malformed)
    order = [n for pair in zip(names[:12], names[12:] + [None] * 12) for n in pair if n]  # interleaved
    with ThreadPoolExecutor(max_workers=len(order) + 1) as pool:
        surrogate = pool.submit(raw_surrogate)
        futures = {n: pool.submit(_call, client, **(valid[n] if n in valid else malformed[n][0])) for n in order}
        got = {n: f.result() for n, f in futures.items()}
        got["lone_surrogate"] = surrogate.result()
    assert server.alive(), "server process died"

    report = "\n".join(f"{n}: {o.status} {o.seconds:.1f}s {o.message[:160]!r}" for n, o in got.items())
    print(report)  # pytest -rP shows it: status, latency and message of every request
    assert all(o.status < 500 for o in got.values()), f"5xx answers:\n{report}"
    for name in valid:
        assert got[name].status == 200 and got[name].content, f"{name}:\n{report}"
    for name, (_, status, words) in malformed.items():
        assert got[name].status == status, f"{name}: expected {status}\n{report}"
        for w in words:
            assert w.lower() in got[name].message.lower(), f"{name}: {w!r} not in the message\n{report}"
    assert got["lone_surrogate"].status == 400, report
    assert "messages[0].content" in got["lone_surrogate"].message and "surrogate" in got["lone_surrogate"].message
    for name in ("dead_url", "closed_port"):
        assert got[name].seconds <= FETCH_TIMEOUT_S + FETCH_SLACK_S, f"{name} took {got[name].seconds:.1f}s"
    assert got["dead_url"].seconds >= FETCH_TIMEOUT_S - 0.5  # it did wait for the host (the bound is the timeout)

    # batched answers equal sequential ones (greedy)
    for name, request in valid.items():
        assert _call(client, **request).content == got[name].content, name
    assert server.alive() and httpx.get(f"{server.base}/health", timeout=10).status_code == 200
