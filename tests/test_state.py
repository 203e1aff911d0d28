"""Every stateful class round-trips through JSON, and a restore mid-stream changes nothing."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Protocol

import pytest

from conftest import falling_curve
from spikewatch.channel import MetricChannel
from spikewatch.detectors.drift import PageHinkleyDetector
from spikewatch.detectors.nonfinite import NonFiniteDetector
from spikewatch.detectors.robust import RobustSpikeDetector
from spikewatch.detectors.window import RollingWindow
from spikewatch.monitor import Monitor
from spikewatch.policy import Policy
from spikewatch.records import Signal, SignalKind, StepRecord
from spikewatch.settings import MonitorConfig


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _stream() -> list[float]:
    xs: list[float] = falling_curve(400, seed=11)
    xs[150] += 2.0
    xs[151] = math.nan
    xs[300:] = [x + 1.5 for x in xs[300:]]
    return xs


def _window_step(obj: Any, t: int, x: float) -> object:
    if math.isfinite(x):
        obj.push(x)
    return obj.median()


def _robust_step(obj: Any, t: int, x: float) -> object:
    return (obj.update(x), obj.score, obj.level_shift)


def _ph_step(obj: Any, t: int, x: float) -> object:
    return obj.update(x - 3.0)


def _policy_step(obj: Any, t: int, x: float) -> object:
    kind: SignalKind = "level_shift" if x > 4.5 else "spike"
    s = Signal(
        run="r",
        kind=kind,
        metric="loss",
        step=t,
        value=x,
        score=9.0,
        baseline=3.0,
        onset_step=t,
        peak_step=t,
        transient=kind == "spike",
        stage="confirmed",
    )
    return obj.decide(s)


CASES: list[tuple[str, Callable[[], Any], Callable[[Any, int, float], object]]] = [
    ("window", lambda: RollingWindow(size=20), _window_step),
    ("robust", RobustSpikeDetector, _robust_step),
    ("nonfinite", NonFiniteDetector, lambda o, t, x: (o.update(x), o.consecutive)),
    ("page_hinkley", PageHinkleyDetector, _ph_step),
    ("policy", Policy, _policy_step),
    (
        "channel",
        lambda: MetricChannel("r", "loss", MonitorConfig()),
        lambda o, t, x: o.update(t, x),
    ),
    ("monitor", Monitor, lambda o, t, x: o.observe(StepRecord(run="run", step=t, loss=x))),
]


@pytest.mark.parametrize(("name", "make", "step"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("cut", [10, 152, 310])
def test_save_and_load_mid_stream_changes_nothing(
    name: str, make: Callable[[], Stateful], step: Callable[[Any, int, float], object], cut: int
) -> None:
    xs = _stream()
    original = make()
    for t in range(cut):
        step(original, t, xs[t])
    state = json.loads(json.dumps(original.state_dict()))  # plain JSON types only
    restored = make()
    restored.load_state_dict(state)
    tail_a = [step(original, t, xs[t]) for t in range(cut, len(xs))]
    tail_b = [step(restored, t, xs[t]) for t in range(cut, len(xs))]
    assert repr(tail_a) == repr(tail_b)  # repr: NaN values compare equal
