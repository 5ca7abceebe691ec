"""What the config modules share: the algorithm names, the error naming file, layer and key,
and the checks of values that the JSON configs and the simplified configs both hold."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from amct_retrain.errors import ConfigError

CONFIG_VERSION = 1
# The algorithm each config block names, as the types the JSON schema checks them with.
DataAlgo = Literal["ulq_quantize"]
WeightAlgo = Literal["arq_retrain"]
CalibrationDataAlgo = Literal["ifmr"]
CalibrationWeightAlgo = Literal["arq_quantize"]
DATA_ALGO: str = get_args(DataAlgo)[0]
WEIGHT_ALGO: str = get_args(WeightAlgo)[0]
CALIBRATION_DATA_ALGO: str = get_args(CalibrationDataAlgo)[0]
CALIBRATION_WEIGHT_ALGO: str = get_args(CalibrationWeightAlgo)[0]


def config_error(path: str, message: str, layer: str | None = None, key: str | None = None) -> ConfigError:
    """The ConfigError of ``message`` at ``path: layer 'L': key 'K'``."""
    where = path
    if layer is not None:
        where += f": layer {layer!r}"
    if key is not None:
        where += f": key {key!r}"
    return ConfigError(f"{where}: {message}")


def check_clips(path: str, layer: str | None, key: str, clip_min: float, clip_max: float) -> None:
    for name, v in (("clip_min", clip_min), ("clip_max", clip_max)):
        if not math.isfinite(v):
            raise config_error(path, f"{name} must be a finite number, got {v}", layer, f"{key}.{name}")
    if clip_min >= clip_max:
        raise config_error(path, f"clip_min ({clip_min}) must be less than clip_max ({clip_max})", layer,
                           f"{key}.clip_min")
    # The quantized range always holds an exact 0 (zero padding, ReLU outputs).
    if clip_min > 0:
        raise config_error(path, f"clip_min ({clip_min}) must be <= 0: the range must contain 0", layer,
                           f"{key}.clip_min")
    if clip_max < 0:
        raise config_error(path, f"clip_max ({clip_max}) must be >= 0: the range must contain 0", layer,
                           f"{key}.clip_max")


@dataclass(frozen=True)
class IfmrParams:
    """The IFMR range search of one layer's activations (``activation_quant_params``).

    As in amct_caffe, ``min_percentile`` is the share of values at or above the lower bound:
    the lower bound is the ``1 - min_percentile`` quantile (0.999999: the 0.000001 quantile of the
    contract). The upper bound starts at the ``max_percentile`` quantile and is searched over
    ``search_start * max, ..., search_end * max`` in steps of ``search_step``.
    """
    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_start: float = 0.7
    search_end: float = 1.3
    search_step: float = 0.01

    def ifmr_kwargs(self) -> dict[str, float]:
        """The arguments of :func:`amct_retrain.numerics.ifmr_search`."""
        return {"min_percentile": 1.0 - self.min_percentile, "max_percentile": self.max_percentile,
                "search_start": self.search_start, "search_end": self.search_end, "search_step": self.search_step}


def check_ifmr(path: str, layer: str | None, key_of: Callable[[str], str], p: IfmrParams) -> IfmrParams:
    """``p`` if its values are usable; else a ConfigError naming ``key_of(field)``."""
    for field in ("max_percentile", "min_percentile"):
        v = getattr(p, field)
        if not (math.isfinite(v) and 0.5 < v <= 1.0):
            raise config_error(path, f"{field} must lie in (0.5, 1], got {v}", layer, key_of(field))
    if not (math.isfinite(p.search_start) and math.isfinite(p.search_end) and 0 < p.search_start <= p.search_end):
        raise config_error(path, f"the search range must satisfy 0 < start <= end, got [{p.search_start}, "
                           f"{p.search_end}]", layer, key_of("search_start"))
    if not (math.isfinite(p.search_step) and p.search_step > 0):
        raise config_error(path, f"search_step must be a positive number, got {p.search_step}", layer,
                           key_of("search_step"))
    return p
