"""amct_retrain: quantization-aware retraining and INT8 export for Caffe models.

The public API of the contract's section 1 (``import amct_retrain as amct``).
"""
from amct_retrain import caffe_build
from amct_retrain.auto_calibration import AutoCalibrationEvaluatorBase, accuracy_based_auto_calibration
from amct_retrain.calibration import convert_model, create_quant_config, init, quantize_model, save_model
from amct_retrain.config import create_quant_retrain_config
from amct_retrain.errors import AmctError, ConfigError, ModelError, NumericsError, RecordFileError, SolverError
from amct_retrain.retrain import create_quant_retrain_model
from amct_retrain.runtime import set_cpu_mode, set_gpu_mode, set_logging_level
from amct_retrain.saver import save_quant_retrain_model

__all__ = ["create_quant_retrain_config", "create_quant_retrain_model", "save_quant_retrain_model",
           "create_quant_config", "init", "quantize_model", "save_model", "convert_model",
           "AutoCalibrationEvaluatorBase", "accuracy_based_auto_calibration",
           "set_cpu_mode", "set_gpu_mode", "set_logging_level",
           "AmctError", "ConfigError", "ModelError", "NumericsError", "RecordFileError", "SolverError"]

# At start-up: say which of the project's Caffe fixes the Caffe in use lacks (a user's own Caffe).
caffe_build.report()
