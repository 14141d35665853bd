"""The checkpoint format (the shared wall): imported by calibration and runtime, imports neither."""

from vllm_qe.format.checkpoint import inspect_checkpoint, load_tensors, read_qe_config, write_checkpoint
from vllm_qe.format.module import QuantizedLinear
from vllm_qe.format.spec import (
    FORMAT_VERSION,
    QUANT_METHOD,
    ActivationScheme,
    AdapterScheme,
    FormatError,
    ModuleScheme,
    QEConfig,
    WeightScheme,
)

__all__ = [
    "FORMAT_VERSION", "QUANT_METHOD", "ActivationScheme", "AdapterScheme", "FormatError", "ModuleScheme",
    "QEConfig", "QuantizedLinear", "WeightScheme", "inspect_checkpoint", "load_tensors", "read_qe_config",
    "write_checkpoint",
]
