#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, lint, then both test tiers (README, "Tests"):
#   fast:  pytest -m "not vllm"             algorithms, format, kernel references (under 3 minutes on 2 cores)
#   rest:  pytest -m "vllm or integration"  tiny-model calibrations, CLI / torchrun subprocesses, vLLM engines
# `scripts/test.sh fast ...` or `scripts/test.sh rest ...` runs one tier; other arguments go to pytest.
# `slow` tests (minutes each) run only when asked: `.venv/bin/python -m pytest -m slow`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tiers="fast rest"
if [[ "${1:-}" == "fast" || "${1:-}" == "rest" ]]; then
  tiers="$1"
  shift
fi
bash "$root/scripts/setup.sh"
cd "$root"
.venv/bin/ruff check .
export TRITON_INTERPRET=1
rc=0
fast_s=""
for tier in $tiers; do
  start=$(date +%s)
  if [[ "$tier" == "fast" ]]; then
    .venv/bin/python -m pytest -m "not vllm" "$@" || rc=$?
    fast_s=$(( $(date +%s) - start ))
    echo "fast tier (pytest -m \"not vllm\"): ${fast_s} s on $(nproc) cores"
  else
    .venv/bin/python -m pytest -m "vllm or integration" "$@" || rc=$?
    echo "second tier (pytest -m \"vllm or integration\"): $(( $(date +%s) - start )) s"
  fi
done
if [[ -n "$fast_s" ]]; then
  echo "fast tier time: ${fast_s} s (target: under 180 s on 2 cores)"
fi
exit $rc
