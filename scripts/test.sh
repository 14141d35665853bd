#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, lint, then pytest (default run excludes `-m slow`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
.venv/bin/ruff check .
export TRITON_INTERPRET=1
exec .venv/bin/python -m pytest "$@"
