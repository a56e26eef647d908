"""The tests' sorted-unique helpers give exactly what numpy's set functions give."""
from __future__ import annotations

import numpy as np
import pytest

from psd.keysets import setdiff, unique


@pytest.mark.parametrize("n", [0, 1, 2, 7, 5000])
def test_unique_and_setdiff_match_numpy(n):
    rng = np.random.default_rng(n)
    for dtype, high in ((np.uint64, 2**64 - 1), (np.int64, 50), (np.uint64, max(n, 1))):
        a = rng.integers(0, high, n, dtype=dtype, endpoint=True)
        for b in (a[: n // 2], rng.integers(0, high, n + 3, dtype=dtype, endpoint=True), a[:0]):
            got, want = unique(a), np.unique(a)
            assert got.dtype == want.dtype and np.array_equal(got, want)
            got, want = setdiff(a, b), np.setdiff1d(a, b)
            assert got.dtype == want.dtype and np.array_equal(got, want), (a, b)
