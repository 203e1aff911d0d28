from __future__ import annotations

import math
import random

import pytest

from conftest import falling_curve
from spikewatch.detectors.drift import PageHinkleyDetector
from spikewatch.detectors.nonfinite import NonFiniteDetector
from spikewatch.detectors.robust import RobustSpikeDetector
from spikewatch.detectors.window import RollingWindow
from spikewatch.errors import ConfigError


def _flags(det: RobustSpikeDetector, xs: list[float]) -> list[int]:
    return [t for t, x in enumerate(xs) if det.update(x)]


def test_spikes_on_a_falling_curve_are_found_at_their_step() -> None:
    xs = falling_curve(1000, seed=4)
    for t, bump in [(120, 1.0), (121, 0.9), (500, 0.6), (800, 2.0)]:
        xs[t] += bump
    assert _flags(RobustSpikeDetector(), xs) == [120, 121, 500, 800]


def test_flagged_points_stay_out_of_the_baseline() -> None:
    xs = falling_curve(400, seed=5)
    spikes = list(range(200, 260, 4))  # a burst of spikes every 4 steps
    for t in spikes:
        xs[t] += 1.5
    assert _flags(RobustSpikeDetector(), xs) == spikes


def test_a_fast_decrease_is_never_a_spike() -> None:
    # The early phase of training: a steep fall, then a sudden drop (LR decay, new epoch).
    rng = random.Random(2)
    xs = [10.0 * 0.93**t + 2.0 + rng.gauss(0, 0.02) for t in range(300)]
    xs[150:] = [x - 1.0 for x in xs[150:]]
    det = RobustSpikeDetector(warmup=0)
    assert _flags(det, xs) == []


def test_warmup_suppresses_alarms() -> None:
    xs = falling_curve(200, seed=1)
    xs[30] += 3.0
    assert _flags(RobustSpikeDetector(warmup=50), list(xs)) == []
    assert _flags(RobustSpikeDetector(warmup=0), list(xs)) == [30]


def test_min_rise_filters_tiny_jumps_of_a_quiet_curve() -> None:
    xs = [2.0 + 0.0001 * math.sin(t) for t in range(200)]
    xs[150] += 0.05  # hundreds of sigmas, but only 2.5% of the loss
    assert _flags(RobustSpikeDetector(), list(xs)) == []
    assert _flags(RobustSpikeDetector(min_rise=0.0), list(xs)) == [150]


def test_a_persistent_jump_becomes_the_new_level() -> None:
    xs = falling_curve(300, seed=3)
    xs[150:] = [x + 2.0 for x in xs[150:]]
    det = RobustSpikeDetector(max_consecutive=10)
    shifts = []
    flags = []
    for t, x in enumerate(xs):
        if det.update(x):
            flags.append(t)
        if det.level_shift:
            shifts.append(t)
    assert flags == list(range(150, 160))
    assert shifts == [159]
    assert det.baseline > 4.0


def test_nonfinite_values_are_ignored_by_the_spike_score() -> None:
    det = RobustSpikeDetector()
    xs = falling_curve(100)
    xs[70] = math.nan
    xs[71] = math.inf
    assert _flags(det, xs) == []


def test_nonfinite_detector_counts_runs() -> None:
    det = NonFiniteDetector()
    seen = [det.update(x) for x in [1.0, math.nan, -math.inf, 2.0, math.inf]]
    assert seen == [False, True, True, False, True]
    assert (det.consecutive, det.total) == (1, 3)


def test_page_hinkley_ignores_noise_and_negative_drift() -> None:
    rng = random.Random(0)
    det = PageHinkleyDetector()
    assert not any(det.update(rng.gauss(-0.5, 1.0)) for _ in range(20_000))


def test_page_hinkley_finds_a_sustained_excess_and_its_onset() -> None:
    det = PageHinkleyDetector(delta=0.5, threshold=10.0)
    zs = [0.0] * 100 + [3.0] * 10
    alarms = [t for t, z in enumerate(zs) if det.update(z)]
    assert alarms == [104, 109]  # 5 x (3 - 0.5) = 12.5 > 10, then it restarts
    assert alarms[0] - det.onset_offset == 100


def test_rolling_window_statistics() -> None:
    w = RollingWindow(size=4)
    for x in [5.0, 1.0, 3.0, 2.0, 10.0]:
        w.push(x)
    assert w.values() == [1.0, 3.0, 2.0, 10.0]
    assert w.median() == 2.5
    assert w.mad() == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 2}, "window=2 is invalid: use an integer >= 4"),
        ({"threshold": 0}, "threshold=0 is invalid: use a finite number > 0.0"),
        ({"threshold": float("nan")}, "threshold=nan is invalid"),
        ({"min_rise": -1}, "min_rise=-1 is invalid"),
        ({"warmup": "10"}, "warmup='10' is invalid: use an integer >= 0"),
        ({"window": 10, "min_history": 20}, "min_history=20 is invalid: use a value <= window"),
    ],
)
def test_bad_settings_name_field_value_and_fix(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        RobustSpikeDetector(**kwargs)  # type: ignore[arg-type]


def test_page_hinkley_validates() -> None:
    with pytest.raises(ConfigError, match="threshold=-1 is invalid"):
        PageHinkleyDetector(threshold=-1)
