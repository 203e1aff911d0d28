"""Hypothesis: detector invariants that must hold for any stream, not just our examples."""

from __future__ import annotations

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from spikewatch.detectors.drift import PageHinkleyDetector
from spikewatch.detectors.robust import RobustSpikeDetector
from spikewatch.monitor import Monitor
from spikewatch.records import StepRecord

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(value=finite, n=st.integers(min_value=1, max_value=400))
def test_a_constant_stream_never_alarms(value: float, n: int) -> None:
    det = RobustSpikeDetector(warmup=0)
    ph = PageHinkleyDetector()
    mon = Monitor()
    for step in range(n):
        assert not det.update(value)
        assert not ph.update(det.score)
        assert mon.observe(StepRecord(run="run", step=step, loss=value)) == []


def _noisy(seed: int, n: int = 300) -> list[float]:
    rng = random.Random(seed)
    return [1.0 - 0.001 * t + rng.gauss(0, 0.01) for t in range(n)]


@given(
    seed=st.integers(0, 10_000),
    scale=st.floats(min_value=1e-3, max_value=1e3),
    offset=st.floats(min_value=-1e3, max_value=1e3),
    at=st.integers(min_value=60, max_value=299),
    size=st.floats(min_value=0.5, max_value=5.0),
)
def test_a_spike_is_found_whatever_the_scale_and_offset(
    seed: int, scale: float, offset: float, at: int, size: float
) -> None:
    xs = _noisy(seed)
    xs[at] += size  # >= 50 sigma of the 0.01 noise
    det = RobustSpikeDetector(min_rise=0.0)  # min_rise is relative to the level: not affine
    flags = [t for t, x in enumerate(xs) if det.update(scale * x + offset)]
    assert flags == [at]


@given(seed=st.integers(0, 10_000), scale=st.floats(min_value=1e-3, max_value=1e3))
def test_with_default_settings_detection_is_scale_invariant(seed: int, scale: float) -> None:
    xs = _noisy(seed)
    xs[200] += 1.0
    det = RobustSpikeDetector()
    assert [t for t, x in enumerate(xs) if det.update(scale * x)] == [200]


@given(
    seed=st.integers(0, 10_000),
    cut=st.integers(min_value=0, max_value=299),
    spikes=st.lists(st.integers(min_value=0, max_value=299), max_size=5),
)
@settings(max_examples=50, deadline=None)
def test_save_and_load_mid_stream_changes_nothing(seed: int, cut: int, spikes: list[int]) -> None:
    xs = _noisy(seed)
    for t in spikes:
        xs[t] += 1.0
    a = Monitor()
    for t in range(cut):
        a.observe(StepRecord(run="run", step=t, loss=xs[t]))
    b = Monitor()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for t in range(cut, len(xs)):
        rec = StepRecord(run="run", step=t, loss=xs[t])
        assert a.observe(rec) == b.observe(rec)
