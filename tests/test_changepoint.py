from __future__ import annotations

import math
import random

import pytest

from spikewatch.changepoint import ChangePointLocaliser


def _base(n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [3.0 + rng.gauss(0, 0.02) for _ in range(n)]


def _loc(values: list[float], candidate: int) -> tuple[int, int, int | None, bool]:
    loc = ChangePointLocaliser().localise(values, candidate, baseline=3.0, spread=0.02)
    return loc.onset, loc.peak, loc.end, loc.transient


def test_one_step_outlier_is_transient() -> None:
    xs = _base(80)
    xs[64] = 4.0
    assert _loc(xs, 64) == (64, 64, 64, True)


def test_slowly_healing_spike_spans_its_decay() -> None:
    xs = _base(90)
    for i, bump in enumerate([1.0, 0.8, 0.6, 0.45, 0.3, 0.2]):
        xs[60 + i] += bump
    onset, peak, end, transient = _loc(xs, 60)
    assert (onset, peak, transient) == (60, 60, True)
    assert end is not None and 63 <= end <= 65


def test_onset_precedes_the_alarm_for_a_ramp_up() -> None:
    xs = _base(100)
    for i in range(10):
        xs[60 + i] += 0.1 * (i + 1)  # a ramp; stage 1 would only alarm near its top
    xs[70:] = [x + 1.0 for x in xs[70:]]
    onset, _, end, transient = _loc(xs, 66)
    assert 60 <= onset <= 62
    assert end is None and not transient


def test_persistent_jump_reports_the_shift() -> None:
    xs = _base(90)
    xs[64:] = [x + 0.7 for x in xs[64:]]
    loc = ChangePointLocaliser().localise(xs, 64, baseline=3.0, spread=0.02)
    assert (loc.onset, loc.end, loc.transient) == (64, None, False)
    assert loc.shift == pytest.approx(0.7, abs=0.05)


def test_partial_recovery_is_not_transient() -> None:
    xs = _base(90)
    xs[64] += 2.0
    xs[65:] = [x + 0.5 for x in xs[65:]]  # back down, but 25 sigma above where it was
    loc = ChangePointLocaliser().localise(xs, 64, baseline=3.0, spread=0.02)
    assert not loc.transient
    assert loc.shift == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_windows_too_short_for_ruptures_still_answer(n: int) -> None:
    xs = _base(n)
    xs[-1] = 5.0
    loc = ChangePointLocaliser().localise(xs, n - 1, baseline=3.0, spread=0.02)
    assert (loc.onset, loc.peak, loc.end, loc.transient) == (n - 1, n - 1, None, False)


def test_nonfinite_values_count_as_elevated() -> None:
    xs = _base(80)
    xs[60], xs[61] = math.nan, math.inf
    assert _loc(xs, 60) == (60, 60, 61, True)


def test_candidate_outside_window_is_a_bug() -> None:
    with pytest.raises(IndexError, match="candidate=9 is outside the window of 3 values"):
        ChangePointLocaliser().localise([1.0, 2.0, 3.0], 9, baseline=1.0, spread=0.1)
