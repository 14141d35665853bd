"""`python -m vllm_qe.server ARGS`: vLLM's OpenAI server (the same ARGS as `python -m
vllm.entrypoints.openai.api_server`) with client mistakes answered as client errors (4xx naming the problem).

Why a wrapper: the plugin cannot change vLLM's HTTP server, and vLLM 0.32 answers some client mistakes with 5xx:
- a media URL that cannot be fetched (host accepts and never replies, closed port, DNS failure, remote 5xx/408/429):
  `vllm.multimodal.media.connector._wrap_media_fetch_error` turns only remote 4xx into a client error and re-raises
  timeouts and connection errors as they are -> 500, often with an empty message (`TimeoutError()`);
- a `file://` URL without `--allowed-local-media-path`: a `RuntimeError` -> 500;
- a non-base64 `data:` URL: `NotImplementedError` -> 501;
- raw JSON with a lone UTF-16 surrogate (`"\\ud800"`, legal JSON, not Unicode): the string reaches the tokenizer,
  whose internal error comes back.
`install()` widens vLLM's media-fetch error conversion (one module attribute, looked up at call time by
`MediaConnector.load_from_url[_async]`) so these become `VLLMUnprocessableEntityError` (422) naming the URL, and
`main()` adds `RejectLoneSurrogates` through vLLM's own `--middleware` flag (400 naming the JSON field). Everything
else is vLLM's `api_server` main, unchanged. The fetch time bound itself is vLLM's (`VLLM_IMAGE_FETCH_TIMEOUT`,
`VLLM_MEDIA_FETCH_MAX_RETRIES`), set by `vllm_qe.serving.server_env`.
"""

from __future__ import annotations

import binascii
import json
import re
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

MIDDLEWARE = "vllm_qe.server.RejectLoneSurrogates"

# `\ud800`-`\udfff` as a JSON escape; a cheap byte scan decides whether a body needs the full check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB]|\\u[dD][c-fC-F]")


def _fetch_failure(url: str, exc: BaseException) -> str | None:
    """Why fetching `url` failed, for the client, when `exc` is a network-side failure (else None)."""
    import aiohttp
    import requests
    import vllm.envs as envs

    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError, requests.exceptions.Timeout)):
        return (f"no response within the media fetch timeout (VLLM_IMAGE_FETCH_TIMEOUT={envs.VLLM_IMAGE_FETCH_TIMEOUT} "
                f"s for images, {envs.VLLM_MEDIA_FETCH_MAX_RETRIES} attempt(s))")
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"the media host answered HTTP {exc.status}"
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        return f"the media host answered HTTP {exc.response.status_code}"
    if isinstance(exc, (OSError, aiohttp.ClientError, requests.exceptions.RequestException)):
        return f"cannot connect ({type(exc).__name__}: {exc})" if str(exc) else f"cannot connect ({type(exc).__name__})"
    return None


def install() -> None:
    """Make media-fetch failures client errors naming the URL (idempotent; patches one vLLM module attribute)."""
    from vllm.exceptions import VLLMUnprocessableEntityError
    from vllm.multimodal.media import connector

    if getattr(connector._wrap_media_fetch_error, "_vllm_qe", False):
        return
    original = connector._wrap_media_fetch_error

    def wrap_media_fetch_error(url: str, exc: Exception) -> Exception:
        wrapped = original(url, exc)
        if wrapped is not exc:  # vLLM already made it a client error
            return wrapped
        why = _fetch_failure(url, exc)
        if why is None:
            return exc
        # vLLM's sanitize_message (applied to every error message) still replaces path-like parts of a URL with
        # `<path>` (`http://h:1/a/b.png` -> `http://h:1<path>`): scheme, host and port always survive.
        return VLLMUnprocessableEntityError(f"Failed to fetch media from URL {url}: {why}", parameter="image_url",
                                            value=url)

    wrap_media_fetch_error._vllm_qe = True  # type: ignore[attr-defined]
    connector._wrap_media_fetch_error = wrap_media_fetch_error

    # file:// without --allowed-local-media-path raises RuntimeError (-> 500); non-base64 data: URLs raise
    # NotImplementedError (-> 501). Both are the request's fault: re-raise them as ValueError (-> 400). A bad base64
    # payload is already a 400; its message gets the URL's head.
    cls = connector.MediaConnector
    for name in ("_load_file_url", "_load_data_url"):
        fn = getattr(cls, name)
        if getattr(fn, "_vllm_qe", False):
            continue

        def as_value_error(self, *args, _fn=fn, **kwargs):
            try:
                return _fn(self, *args, **kwargs)
            except (RuntimeError, NotImplementedError) as e:
                raise ValueError(str(e)) from e
            except binascii.Error as e:  # a data URL's payload (vLLM's message: "Non-base64 digit found")
                raise ValueError(f"Invalid data URL {str(args[0])[:32]!r}...: not valid base64 ({e})") from e

        as_value_error._vllm_qe = True  # type: ignore[attr-defined]
        setattr(cls, name, as_value_error)


def _is_lone(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _escaped(text: str) -> str:
    return "".join(f"\\u{ord(ch):04x}" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


def lone_surrogate(value: Any, where: str = "") -> str | None:
    """JSON path (`messages[0].content`) of the first string (value or key) in `value` holding a lone UTF-16
    surrogate, else None. `json.loads` joins valid surrogate pairs, so a code point in U+D800..U+DFFF left in a
    string is lone."""
    if isinstance(value, str):
        return (where or "(body)") if _is_lone(value) else None
    if isinstance(value, dict):
        for key, v in value.items():
            path = f"{where}.{_escaped(str(key))}" if where else _escaped(str(key))
            found = path if _is_lone(str(key)) else lone_surrogate(v, path)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = lone_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


class RejectLoneSurrogates:
    """ASGI middleware: 400 for a JSON body holding a lone UTF-16 surrogate, naming the field. Bodies without a
    `\\ud8..`-`\\udf..` escape pass after a byte scan; the body is replayed to the app unchanged."""

    def __init__(self, app: Callable[[Scope, Callable, Callable], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        body = bytearray()
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        where = None
        if _SURROGATE_ESCAPE.search(body):
            try:
                where = lone_surrogate(json.loads(bytes(body)))
            except ValueError:
                where = None  # not JSON: vLLM answers that itself
        if where is not None:
            payload = json.dumps({"error": {
                "message": f"Invalid request body: the JSON string at {where} contains a lone UTF-16 surrogate "
                           "(\\ud800-\\udfff escape without its pair); strings must be valid Unicode",
                "type": "BadRequestError", "param": where, "code": 400}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return

        async def replay() -> Message:
            return received.pop(0) if received else await receive()

        await self.app(scope, replay, send)


def main(argv: list[str] | None = None) -> None:
    """Install the fixes and run vLLM's OpenAI server with `argv` (default: the command line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if MIDDLEWARE not in args:
        args += ["--middleware", MIDDLEWARE]
    install()
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    sys.argv = [sys.argv[0], *args]
    vllm_main()


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__":
    # A process spawned by vLLM from this entry point (e.g. the extra API servers of --api-server-count N)
    # re-imports this module as `__mp_main__` and never calls main(): patch the media fetch there too.
    install()
