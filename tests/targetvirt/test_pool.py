from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from targetvirt.pool import _incref_mostly_run, _tally


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


def _mostly_run(n: int, start: int, strays: dict[int, int]) -> npt.NDArray[np.uint64]:
    psegs = np.arange(start, start + n, dtype=np.uint64)
    for position, segment in strays.items():
        psegs[position] = segment
    return psegs


@pytest.mark.parametrize(
    "psegs",
    [
        _mostly_run(64, 10, {}),  # one run
        _mostly_run(64, 10, {0: 900, 5: 901, 63: 5}),  # a few copied on write
        _mostly_run(64, 10, {3: 14, 4: 13}),  # two entries swapped within the run
        _mostly_run(64, 10, {32: 950}),  # the middle one strays: a wrong guess, a scatter
        _mostly_run(64, 0, {i: 500 + i for i in range(0, 64, 2)}),  # half astray: a scatter
        _mostly_run(64, 10, {32: 990}),  # a guessed run past the refcounts' end: a scatter
        np.random.default_rng(1).permutation(1000)[:64].astype(np.uint64),  # no run at all
    ],
)
def test_incref_of_a_mostly_dense_slice_counts_each_segment_once(
    psegs: npt.NDArray[np.uint64],
) -> None:
    psegs = psegs[psegs < 1000]  # (the refcounts cover 1000 segments)
    refs = np.random.default_rng(2).integers(1, 5, size=1000).astype(np.uint32)
    expected = refs.copy()
    np.add.at(expected, psegs.astype(np.int64), 1)
    _incref_mostly_run(refs, psegs)
    assert refs.tolist() == expected.tolist()
