"""Retrain and calibration configuration: which layers are quantized, and how (contract sections 2 and 4).

The package's modules, each on the ones before it (this module re-exports their public names):

* :mod:`~amct_retrain.config.common`: the algorithm names, the error naming file, layer and key, and
  the checks of values (clips, IFMR parameters) both kinds of config hold.
* :mod:`~amct_retrain.config.simplified`: the simplified config (``config_defination``), in YAML
  (``.yaml``/``.yml``) or protobuf text (``.cfg``), one schema for retraining and one for calibration.
  Both formats are checked against one schema, a proto2 message built at import time from a
  ``FileDescriptorProto`` (the technique of :mod:`amct_retrain.record`: no protoc, no generated file).
  A YAML document is walked against that descriptor, so unknown keys and wrong types are reported the
  same way for both formats, and the same settings give byte-identical JSON.
* :mod:`~amct_retrain.config.schema`: the retrain config JSON (:func:`load_retrain_config`) and the
  calibration config JSON (:func:`load_calibration_config`, post-training calibration), read and
  validated against a net.
* :mod:`~amct_retrain.config.resolve`: the configs resolved against a net: :func:`create_quant_retrain_config`
  and :func:`create_quant_config` write them for every quantizable layer (optionally shaped by a
  simplified config; see :func:`create_quant_config` for the calibration format).

The backend rules (:data:`QUANTIZABLE_RULES`, in :mod:`amct_retrain.layer_types`): which Caffe layer
types can be quantized and under which constraints, as data, so that a new quantizable type is one
more entry, not new code paths.

Design choices (not fixed by the contract):

* Skipped layers are *omitted* from the generated JSON; a quantizable layer absent
  from the JSON stays in float, exactly like one with ``"retrain_enable": false``.
* Overrides replace whole blocks: a per-layer ``retrain_data_quant_config`` is the
  complete data config of that layer (fields it leaves out take the defaults, they
  are not inherited from the per-type or global block).  Field-wise inheritance
  would make it impossible to send one layer back to IFMR initialisation (no clips)
  once the global block sets clips.  Data and weight blocks are resolved separately.
* A global ``channel_wise: true`` applies only to layer types that allow per-channel
  weights (Convolution, Deconvolution); InnerProduct stays per-tensor.  Asking for ``channel_wise:
  true`` on an InnerProduct *type* or *layer* override is an error.
* A layer both skipped and overridden is skipped, with a warning.
* A layer without weights (AVE Pooling) still gets a ``retrain_weight_config`` with
  ``channel_wise: false`` in the generated retrain JSON (the original toolkit's form); reading a
  retrain or calibration JSON does not require a weight block for it.
* Constraints that need the input shape (an AVE Pooling's windows must tile its input) cannot be
  checked on the prototxt: the model builders check them (:func:`without_shape_broken_layers`)
  and leave such a layer in float with a warning, even when the user named it.
* ``log_dir`` is an optional top-level JSON key of ours (not written by the
  generator): where the quant layers write TensorBoard logs.
"""

from amct_retrain.config.common import (CALIBRATION_DATA_ALGO, CALIBRATION_WEIGHT_ALGO, CONFIG_VERSION, DATA_ALGO,
                                        WEIGHT_ALGO, IfmrParams)
from amct_retrain.config.resolve import create_quant_config, create_quant_retrain_config, without_shape_broken_layers
from amct_retrain.config.schema import (CalibrationConfig, LayerCalibrationConfig, LayerQuantConfig, RetrainConfig,
                                        load_calibration_config, load_retrain_config, read_config_json)
from amct_retrain.config.simplified import SimplifiedCalibrationConfig, SimplifiedRetrainConfig, read_simplified_config
from amct_retrain.errors import ConfigError
from amct_retrain.layer_types import (QUANTIZABLE_RULES, TILING_CONSTRAINT, Constraint, QuantRule, layers_by_name,
                                      quantizable_layers, shape_constraint_broken)

__all__ = [
    "ConfigError",
    "Constraint",
    "QuantRule",
    "QUANTIZABLE_RULES",
    "quantizable_layers",
    "shape_constraint_broken",
    "without_shape_broken_layers",
    "TILING_CONSTRAINT",
    "layers_by_name",
    "create_quant_retrain_config",
    "load_retrain_config",
    "RetrainConfig",
    "LayerQuantConfig",
    "SimplifiedRetrainConfig",
    "read_simplified_config",
    "CONFIG_VERSION",
    "DATA_ALGO",
    "WEIGHT_ALGO",
    "create_quant_config",
    "load_calibration_config",
    "read_config_json",
    "CalibrationConfig",
    "LayerCalibrationConfig",
    "IfmrParams",
    "SimplifiedCalibrationConfig",
    "CALIBRATION_DATA_ALGO",
    "CALIBRATION_WEIGHT_ALGO",
]
