"""Small helpers for talking to a vllm-qe server with the official `openai` client."""

from __future__ import annotations

import base64
import io
import time
import urllib.request


def image_data_url(image) -> str:
    """PIL image -> `data:image/png;base64,...`."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(question: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def wait_ready(base: str, proc=None, timeout: float = 240.0) -> None:
    """Poll `GET {base}/health` until it answers 200 (bounded), failing early if `proc` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"server at {base} not ready after {timeout:.0f}s")
