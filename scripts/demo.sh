#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then tiny VLM -> calibrate -> serve -> answer an image question.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python examples/demo.py "$@"
