"""Resume exactness: a calibration interrupted at every block boundary, resumed each time, ends bit-identical to an
uninterrupted run (dense and MoE; no vLLM)."""

from __future__ import annotations

import pytest
import torch

from vllm_qe.calibration.api import CalibrationConfig, calibrate
from vllm_qe.calibration.resume import ResumeStore
from vllm_qe.format.checkpoint import load_tensors, read_config


@pytest.mark.parametrize(("arch", "method", "params"), [
    ("qwen2_vl", "gptq", {}),
    ("qwen3_vl_moe", "veq", {"mode": "me+ma"}),
])
def test_interrupted_at_every_block_boundary_resumes_bit_identical(arch, method, params, tmp_path, tiny_dir,
                                                                  monkeypatch) -> None:
    """The run is stopped right after each block's progress is saved (a kill between blocks), then started again;
    the next run is stopped after the following block, and so on. Every block boundary is thus a resume point
    once, and the final checkpoint must equal the uninterrupted one tensor for tensor."""
    cfg = CalibrationConfig(method=method, group_size=32, num_samples=3, method_params=params)
    full = calibrate(tiny_dir(arch), tmp_path / "full", cfg, progress=False)

    orig = ResumeStore.save
    state = {"stop_after": 1, "saved": []}

    def save_then_stop(self, next_unit, unit_name, *args, **kwargs):
        orig(self, next_unit, unit_name, *args, **kwargs)
        state["saved"].append(next_unit)
        if next_unit == state["stop_after"]:
            raise KeyboardInterrupt(f"stopped after block {unit_name}")

    monkeypatch.setattr(ResumeStore, "save", save_then_stop)
    out = tmp_path / "out"
    interruptions = 0
    while True:
        try:
            calibrate(tiny_dir(arch), out, cfg, progress=False)
            break
        except KeyboardInterrupt:
            interruptions += 1
            assert not out.exists()
            state["stop_after"] += 1
    n_blocks = state["stop_after"] - 1  # stopped after every block, the last one included (before the write)
    assert interruptions == n_blocks >= 5
    assert state["saved"] == list(range(1, n_blocks + 1))
    a, b = load_tensors(full), load_tensors(out)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, differing[:5]
    assert read_config(full)["quantization_config"] == read_config(out)["quantization_config"]
