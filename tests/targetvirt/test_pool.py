from __future__ import annotations

import numpy as np
import pytest

from targetvirt.pool import _tally


@pytest.mark.parametrize("drops", [0, 1, 7, 500, 5000])
def test_tally_counts_each_segment_below_the_container_size(drops: int) -> None:
    # few drops take the sorting path, many the counting path: both must agree with a count
    rng = np.random.default_rng(drops)
    nsegments = 4096
    psegs = rng.integers(0, nsegments + 64, size=drops).astype(np.int64)
    touched, counts = _tally(psegs, nsegments)
    expected = np.bincount(psegs, minlength=nsegments + 64)[:nsegments]
    assert touched.tolist() == np.flatnonzero(expected).tolist()
    assert counts.tolist() == expected[touched].tolist()
    assert counts.dtype == np.uint32
