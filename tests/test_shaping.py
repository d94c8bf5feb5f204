import numpy as np
import pytest

from esft.es import centered_rank, shape, zscore


def test_zscore_known_values():
    z = zscore([1.0, 2.0, 3.0])
    s = np.sqrt(2 / 3)
    assert z == pytest.approx([-1 / s, 0.0, 1 / s])
    assert np.mean(z) == pytest.approx(0)
    assert np.std(z) == pytest.approx(1)


def test_zscore_equal_rewards_give_zero_weights():
    assert zscore([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]


def test_centered_rank_is_outlier_robust_and_tie_aware():
    a = centered_rank([0.0, 1.0, 2.0, 1000.0])
    b = centered_rank([0.0, 1.0, 2.0, 3.0])
    assert a == pytest.approx(b)
    t = centered_rank([1.0, 1.0, 5.0])
    assert t[0] == t[1] and t[2] > t[0]
    assert np.std(b) == pytest.approx(1)


def test_shape_dispatch():
    assert shape([1, 2], "zscore") == zscore([1, 2])
    with pytest.raises(ValueError):
        shape([1, 2], "nope")
