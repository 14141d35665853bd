"""Offline calibration: `calibrate(model_dir, out_dir, CalibrationConfig(...))` (mirrored by `vllm-qe calibrate`).

Never imports vllm.
"""
