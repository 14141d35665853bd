"""Write the outlier variant of a trained model (vllm_qe/testing/outliers.py): the same function, with a few
channels' activations `--scale` x larger, as in pretrained LLMs. The ranking evaluation in docs/results.md uses

    python examples/outlier_fixture.py runs/vqa-hard-3000 runs/vqa-hard-3000-outliers
    python examples/results_table.py --model runs/vqa-hard-3000-outliers --eval-samples 8000 \\
        --settings W4A16 W3A16 W4A6 --methods RTN SmoothQuant AWQ GPTQ "LQER (r=8)" "QE (default)" TLQ
"""

from __future__ import annotations

import argparse

from vllm_qe.testing.outliers import write_outlier_variant


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="HF model folder (one model.safetensors)")
    p.add_argument("dst", help="new folder (must not exist)")
    p.add_argument("--scale", type=float, default=64.0, help="outlier factor, a power of two (exact)")
    p.add_argument("--fraction", type=float, default=0.08, help="share of channels rescaled per norm / MLP")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(write_outlier_variant(a.src, a.dst, a.scale, a.fraction, a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
