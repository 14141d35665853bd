"""`python -m vllm_qe.calibration.cli` keeps working: the command line lives in `vllm_qe/cli.py` (all sub-commands)."""

import sys

from vllm_qe.cli import main

if __name__ == "__main__":
    sys.exit(main())
