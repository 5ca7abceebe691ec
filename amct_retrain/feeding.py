"""Whether a net was fed: factors measured on constant inputs (an unfed ``Input`` net's zeros) are
meaningless, so the layers that measure them refuse such batches, saying how to feed the net."""
from collections.abc import Sequence

import numpy as np

from amct_retrain.errors import DataError

FEED_HINT = ("a net whose data comes from Input layers (a deploy.prototxt) computes on zeros unless it is fed: "
             "set every input blob before each forward (net.blobs['data'].data[...] = batch, then "
             "net.forward()), or run the model with data layers (its train_val.prototxt)")


_CHUNK = 1 << 14
"""Values compared per step of :func:`is_constant`."""


def is_constant(x: np.ndarray) -> bool:
    """True if every value of ``x`` is the same (an empty array included; a NaN makes it False).

    Compares chunk by chunk with the first value and stops at the first chunk that differs, so a
    fed batch costs one chunk, not the passes of ``x.min() == x.max()`` over the whole of it (the
    layers check every TEST batch)."""
    flat = np.ravel(x)
    if flat.size == 0:
        return True
    first = flat[0]
    return all(bool((flat[i:i + _CHUNK] == first).all()) for i in range(0, flat.size, _CHUNK))


def unfed_error(where: str, batches: str, values: Sequence[float]) -> DataError:
    """The error of a layer (``where``) whose input was constant, of ``values``, in ``batches``
    (e.g. "each of the 2 calibration batches")."""
    shown = ", ".join(repr(v) for v in sorted(set(values))[:4])
    return DataError(f"{where}: its input was constant (value {shown}) in {batches}, so no factor can be measured "
                     f"from it: was the net fed? " + FEED_HINT)


def check_fed(batches: Sequence[np.ndarray], where: str, what: str) -> None:
    """Raise :func:`unfed_error` if each of ``batches`` (a layer's input, any shapes) is constant;
    ``what`` names them ("calibration")."""
    if batches and all(is_constant(b) for b in batches):
        raise unfed_error(where, f"each of the {len(batches)} {what} batch(es)",
                          [float(b.ravel()[0]) for b in batches if b.size])
