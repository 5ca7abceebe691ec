"""The project's error classes: every user error a public call raises is an :class:`AmctError`.

Each subclass stays a ``ValueError`` too, so scripts written against earlier releases that
catch ``ValueError`` keep working. This module imports nothing of the project, so the
layers, numerics and every API module can share it.
"""


class AmctError(ValueError):
    """A user error: the message names the file, the layer and the field where there are any."""


class ConfigError(AmctError):
    """A model, retrain config or simplified config is missing or invalid."""


class ModelError(AmctError):
    """A model or weights file that cannot be used."""


class RecordFileError(AmctError):
    """A record file is missing, unparsable or inconsistent."""


class SolverError(AmctError):
    """A solver file that breaks a rule."""


class NumericsError(AmctError):
    """Invalid input to, or an unrepresentable result of, the quantization numerics."""


class LayerParamError(AmctError):
    """A quant layer's param_str is invalid."""


class DataError(AmctError):
    """The data a net ran on cannot give factors: every batch a quantized layer saw was constant
    (a net fed by Input layers that nobody fed computes on zeros)."""


class ArgumentError(AmctError, TypeError):
    """An argument of a public call of the wrong type or value (also a ``TypeError``)."""


class InputMissingError(AmctError, FileNotFoundError):
    """An input file that does not exist (also a ``FileNotFoundError``)."""


class OutputPathError(AmctError):
    """An output path that cannot be written as asked: one of the call's inputs, a folder, empty."""


class AnalysisError(AmctError):
    """Bad arguments to the per-layer analysis (iterations, the inputs fed to an Input net)."""
