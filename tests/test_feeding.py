"""feeding.is_constant: chunked, early-stopping, with the results of ``x.min() == x.max()``."""
import numpy as np
import pytest

from amct_retrain import feeding


@pytest.mark.parametrize("x", [
    np.zeros(0, np.float32), np.zeros((2, 3), np.float32), np.full(3 * feeding._CHUNK + 5, 2.5, np.float32),
    np.array([np.inf, np.inf], np.float32), np.array([-0.0, 0.0], np.float32),
    np.array([np.nan, np.nan], np.float32), np.array([1.0, np.nan], np.float32),
    np.arange(10, dtype=np.float32)])
def test_is_constant_is_min_equals_max(x):
    expected = x.size == 0 or bool(x.min() == x.max())
    assert feeding.is_constant(x) is expected, f"is_constant({x[:4]}...) is not {expected}"


def test_a_value_that_differs_in_the_last_chunk_makes_it_not_constant():
    x = np.zeros((4, 2 * feeding._CHUNK + 3), np.float32)
    x[-1, -1] = 1e-30
    assert not feeding.is_constant(x), "the last chunk's value was missed"
