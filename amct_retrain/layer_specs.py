"""The contract of every Python layer the toolkit puts into a Caffe net, one spec per layer:
its module and class, its ``param_str`` keys (JSON types, default, required) and its blobs by name.

The builders (graph/quant_layers.py, reference.py) write param_str and params from these specs,
the layers (layers/*.py) parse their param_str and index their blobs with them, and the code that
reads the layers' blobs from a caffemodel (saver, strip, retrain, solver) looks blobs up by name.
A blob's param name (shared between layers through ``param { name }``) is ``<owner layer>/<blob>``.

The keys are those of the prototxts users have saved: a key must keep its name and meaning (the
golden files under tests/golden/ hold such a model). No Caffe import here: the layers' numerics
and these specs load without pycaffe.
"""
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from amct_retrain.errors import LayerParamError
from amct_retrain.numerics import BITS_RANGE, DEFAULT_BITS
from amct_retrain.tensorboard import LAYER_LOG_EVERY

LAYERS_MODULE = "amct_retrain_layers"
NUMBER = (int, float)
NULL = type(None)
READY, LAST_MIN, LAST_MAX = 0, 1, 2
"""Entries of ActivationULQ's ``clip_state`` blob: [ready flag, min, max of its last forward]."""


def shares_memory(a: Any, b: Any) -> bool:
    """Whether two Caffe blobs hold the same data (a layer run in place: its top is its bottom)."""
    return bool(a.data.__array_interface__["data"][0] == b.data.__array_interface__["data"][0])


@dataclass(frozen=True)
class Key:
    """One accepted param_str key: its JSON type(s), whether it must be present, and the values it
    may take (``choices``; None: any of its types)."""
    types: tuple
    required: bool = False
    default: Any = None
    choices: Collection | None = None


@dataclass(frozen=True)
class LayerSpec:
    """One Python layer: ``amct_retrain_layers.<module>.<layer_class>``, its param_str ``keys``
    and its ``blobs`` in order; an ``optional_blobs`` blob exists only in some configurations
    (``present`` below names the optional blobs a layer has)."""
    module: str
    layer_class: str
    keys: Mapping[str, Key]
    blobs: tuple[str, ...] = ()
    optional_blobs: frozenset[str] = field(default_factory=frozenset)

    @property
    def python_module(self) -> str:
        """The ``python_param.module`` of the layer."""
        return f"{LAYERS_MODULE}.{self.module}"

    def is_layer(self, layer: Any) -> bool:
        """Whether ``layer`` (a caffe_pb2.LayerParameter) is one of this spec's layers."""
        return (layer.type == "Python" and layer.python_param.module == self.python_module
                and layer.python_param.layer == self.layer_class)

    def blob_names(self, present: Collection[str] = ()) -> tuple[str, ...]:
        """The layer's blob names in blob order, of the optional ones only those in ``present``."""
        return tuple(b for b in self.blobs if b not in self.optional_blobs or b in present)

    def blob(self, name: str, present: Collection[str] = ()) -> int:
        """The index of blob ``name`` (also the index of its ``param`` entry)."""
        return self.blob_names(present).index(name)

    def ordered(self, blobs: Mapping[str, Any]) -> list:
        """``blobs`` (blob name -> value, optional blobs as they apply) as the layer's blob list."""
        unknown = set(blobs) - set(self.blobs)
        names = self.blob_names(blobs.keys())
        if unknown or set(names) != set(blobs):
            raise ValueError(f"{self.layer_class}: blobs {sorted(blobs)}, expected {list(names)}")
        return [blobs[name] for name in names]

    def parse(self, param_str: str) -> dict[str, Any]:
        """Parse ``param_str`` (a JSON object) against ``keys``; fill defaults.

        Every spec has a required ``name`` key (pycaffe does not tell a Python layer its own
        name), used in every later error message; errors name the layer class, layer and key.
        """
        try:
            params = json.loads(param_str or "{}")
        except json.JSONDecodeError as err:
            raise LayerParamError(f"{self.layer_class}: param_str is not valid JSON ({err}): {param_str!r}") from None
        if not isinstance(params, dict):
            raise LayerParamError(f"{self.layer_class}: param_str must be a JSON object, got {param_str!r}")
        where = f"{self.layer_class} layer '{params.get('name', '?')}'"
        for key in params:
            if key not in self.keys:
                raise LayerParamError(f"{where}: unknown param_str key '{key}' (known: {sorted(self.keys)})")
        parsed = {}
        for key, spec in self.keys.items():
            if key not in params:
                if spec.required:
                    raise LayerParamError(f"{where}: param_str key '{key}' is required")
                parsed[key] = spec.default
                continue
            value = params[key]
            # bool is an int in Python: never accept it where a number is meant, nor the reverse.
            wrong_bool = isinstance(value, bool) and bool not in spec.types
            if wrong_bool or not isinstance(value, spec.types):
                names = "/".join("null" if t is NULL else t.__name__ for t in spec.types)
                raise LayerParamError(f"{where}: param_str key '{key}' must be {names}, got {value!r}")
            if spec.choices is not None and value not in spec.choices:
                raise LayerParamError(f"{where}: param_str key '{key}' must be one of {_shown(spec.choices)}, "
                                      f"got {value!r}")
            parsed[key] = value
        return parsed


def _shown(choices: Collection) -> str:
    return f"{choices.start}..{choices.stop - 1}" if isinstance(choices, range) else ", ".join(map(repr, choices))


def param_name(owner: str, blob: str) -> str:
    """The param name of blob ``blob`` of layer ``owner``, by which other layers share it."""
    return f"{owner}/{blob}"


_NAME = {"name": Key((str,), required=True)}
_LOG = {"log_dir": Key((str, NULL)), "log_every": Key((int,), default=LAYER_LOG_EVERY)}
# The bit widths of a layer's activations (``num_bits_d``) and weights (``num_bits_w``), as in the
# record; absent (every model saved before there were bit widths) is 8. The builders write them only
# when they are not 8, so the param_str of an 8-bit layer stays as it was.
BITS_D = {"num_bits_d": Key((int,), default=DEFAULT_BITS, choices=BITS_RANGE)}
BITS_W = {"num_bits_w": Key((int,), default=DEFAULT_BITS, choices=BITS_RANGE)}

ACTIVATION_ULQ = LayerSpec("activation", "ActivationULQ", {
    **_NAME,
    "clip_max": Key(NUMBER + (NULL,)),
    "clip_min": Key(NUMBER + (NULL,)),
    "fixed_min": Key((bool,), default=False),
    **_LOG,
    # The TEST batches of a shift-N search: a constant input in all of them (an unfed net) is an error.
    "batch_num": Key((int,), default=1),
    **BITS_D,
}, blobs=("clip_max", "clip_min", "clip_state"))
"""Retraining: fake-quantizes a layer's input with learnable clips. Blobs (1,), (1,) and (3,)
(clip_state: READY, LAST_MIN, LAST_MAX)."""

WEIGHT_ARQ = LayerSpec("weight", "WeightARQ", {
    **_NAME,
    "weight_shape": Key((list,), required=True),
    "channel_axis": Key((int, NULL)),
    **_LOG,
    # A per-channel Convolution: the ActivationULQ whose clip state it shares, and the
    # convolution's geometry, to tell a 1 x 1 output ("global conv") from the input shape.
    "activation_quantizer": Key((str, NULL)),
    "conv": Key((dict, NULL)),
    **BITS_W,
    **BITS_D,  # of that ActivationULQ: a global conv's unified scale_w is deq_max / scale_d
}, blobs=("fake_quant_weights", "master_weights", "clip_state", "scale_w"), optional_blobs=frozenset({"clip_state"}))
"""Retraining: fake-quantizes a layer's weights from its float master weights. ``clip_state`` (its
ActivationULQ's, shared) only with ``activation_quantizer``; ``scale_w`` is the scale of its last
forward, shared with ShiftNSearch."""

SHIFT_N_SEARCH = LayerSpec("shift_n", "ShiftNSearch", {
    **_NAME,
    "quantized_layer": Key((str,), required=True),
    "activation_quantizer": Key((str,), required=True),  # the ActivationULQ whose clip state it shares
    "fused": Key((dict, NULL)),  # for the saver's quant info: BatchNorm/Scale folded into the layer
    "record_file": Key((str,), required=True),
    "batch_num": Key((int,), default=1),
    "weight_shape": Key((list, NULL)),
    "scale_w": Key((list, NULL)),  # a layer without weights (AVE Pooling): its fixed scale_w
    "channel_axis": Key((int, NULL)),
    "log_dir": Key((str, NULL)),
    **BITS_D,
    **BITS_W,
}, blobs=("clip_state", "scale_w"), optional_blobs=frozenset({"scale_w"}))
"""Retraining: searches the shift_bit of a layer's output in TEST and writes its record. Its blobs
are shared: the ActivationULQ's clip_state and, for a layer with weights, the WeightARQ's scale_w."""

ACTIVATION_OBSERVER = LayerSpec("calibration", "ActivationObserver", {
    **_NAME,
    "layers": Key((list,), required=True),  # the quantized layers it serves (they share scale_d)
    "record_file": Key((str,), required=True),
    "batch_num": Key((int,), default=1),
    "ifmr": Key((dict,), required=True),  # numerics.ifmr_search's keyword arguments
    "symmetric": Key((bool,), default=False),
    **BITS_D,
})
"""Calibration: IFMR of the quantized layers' common input; writes their scale_d / offset_d."""

SHIFT_N_OBSERVER = LayerSpec("calibration", "ShiftNObserver", {
    **_NAME,
    "quantized_layer": Key((str,), required=True),
    "record_file": Key((str,), required=True),
    "batch_num": Key((int,), default=1),
})
"""Calibration: the shift-N search of a quantized layer's output; writes its shift_bit."""

FAKE_QUANT_ACTIVATION = LayerSpec("fixed", "FakeQuantActivation", {
    **_NAME,
    "scale_d": Key(NUMBER, required=True),
    "offset_d": Key((int,), required=True),
    **BITS_D,
})
"""The saved fake-quant model: the fixed activation quantizer before a quantized layer."""

REQUANTIZE = LayerSpec("fixed", "Requantize", {
    **_NAME,
    "deq": Key((list,), required=True),
    "shift_bit": Key((list,), required=True),
})
"""The saved fake-quant model: the int16 requantisation after a quantized layer."""

INTEGER_LAYER = LayerSpec("integer", "IntegerLayer", {
    **_NAME,
    "layer": Key((str,), required=True),
    "layer_type": Key((str,), required=True),
    "dequant": Key((str,), required=True),
    "weights_file": Key((str,), required=True),
    "quant_scale": Key(NUMBER, required=True),
    "quant_offset": Key((int,), required=True),
    "conv": Key((dict, NULL)),
    **BITS_D,  # the Quant layer's codes (the deploy model does not hold it: the quant info file does)
})
"""The integer reference executor: a deploy model's Quant -> layer -> DeQuant in integers."""

TEST_OUTPUT_LOG = LayerSpec("test_outputs", "TestOutputLog", {
    **_NAME,
    "log_dir": Key((str,), required=True),
    "outputs": Key((list,), required=True),  # the blob names of its bottoms, in order
})
"""Retraining under plain ``caffe train``: in place on the TEST net's outputs, logs their means
over each TEST pass to TensorBoard. No blobs."""

ALL_SPECS = (ACTIVATION_ULQ, WEIGHT_ARQ, SHIFT_N_SEARCH, TEST_OUTPUT_LOG, ACTIVATION_OBSERVER, SHIFT_N_OBSERVER,
             FAKE_QUANT_ACTIVATION, REQUANTIZE, INTEGER_LAYER)
"""Every Python layer the toolkit inserts."""
