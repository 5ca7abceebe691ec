"""amct_retrain: quantization-aware retraining and INT8 export for Caffe models.

The public API of the contract's section 1 (``import amct_retrain as amct``). Each name loads its
module on first use (PEP 562), so that importing a pure module (``amct_retrain.numerics``,
``errors``, ``record``, ...) does not load pycaffe.
"""
import importlib

from amct_retrain.errors import (AmctError, AnalysisError, ArgumentError, ConfigError, DataError, InputMissingError,
                                 ModelError, NumericsError, OutputPathError, RecordFileError, SolverError)

# Public name -> the module defining it.
_LAZY = {
    "analyze": "amct_retrain.analysis",
    "create_quant_retrain_config": "amct_retrain.config",
    "create_quant_retrain_model": "amct_retrain.retrain",
    "save_quant_retrain_model": "amct_retrain.saver",
    "regenerate_record": "amct_retrain.saver",
    "create_solver": "amct_retrain.solver",
    "check_solver": "amct_retrain.solver",
    "train": "amct_retrain.solver",
    "export_onnx": "amct_retrain.export",  # imports onnx, an optional dependency: only when asked for
    "create_quant_config": "amct_retrain.calibration",
    "init": "amct_retrain.calibration",
    "quantize_model": "amct_retrain.calibration",
    "save_model": "amct_retrain.calibration",
    "convert_model": "amct_retrain.calibration",
    "AutoCalibrationEvaluatorBase": "amct_retrain.auto_calibration",
    "accuracy_based_auto_calibration": "amct_retrain.auto_calibration",
    "set_cpu_mode": "amct_retrain.runtime",
    "set_gpu_mode": "amct_retrain.runtime",
    "set_logging_level": "amct_retrain.runtime",
}

__all__ = ["create_quant_retrain_config", "create_quant_retrain_model", "save_quant_retrain_model",
           "create_solver", "check_solver", "train", "export_onnx", "regenerate_record",
           "create_quant_config", "init", "quantize_model", "save_model", "convert_model",
           "AutoCalibrationEvaluatorBase", "accuracy_based_auto_calibration",
           "analyze", "set_cpu_mode", "set_gpu_mode", "set_logging_level",
           "AmctError", "AnalysisError", "ArgumentError", "ConfigError", "DataError", "InputMissingError", "ModelError",
           "NumericsError", "OutputPathError", "RecordFileError", "SolverError"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # loaded once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
