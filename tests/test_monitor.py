from __future__ import annotations

import math
import random

from conftest import falling_curve
from spikewatch.monitor import Monitor
from spikewatch.records import StepRecord
from spikewatch.settings import MonitorConfig

Row = tuple[int, str, str, str]


def _feed(mon: Monitor, losses: list[float], grads: list[float] | None = None) -> list[Row]:
    out: list[Row] = []
    for step, loss in enumerate(losses):
        g = None if grads is None else grads[step]
        for d in mon.observe(StepRecord(run=mon.run, step=step, loss=loss, grad_norm=g)):
            assert d.signal is not None
            out.append((d.step, d.action, d.signal.kind, d.signal.metric))
    return out


def test_healthy_run_raises_nothing(healthy: list[float]) -> None:
    mon = Monitor()
    assert _feed(mon, healthy) == []
    assert mon.incidents == []


def test_nan_loss_skips_then_rolls_back() -> None:
    xs = falling_curve(300)
    xs[200:203] = [math.nan] * 3
    mon = Monitor()
    got = _feed(mon, xs)
    assert got == [
        (200, "skip_step", "nonfinite", "loss"),
        (201, "skip_step", "nonfinite", "loss"),
        (202, "rollback", "nonfinite", "loss"),
        (203, "watch", "nonfinite", "loss"),  # finite again: the episode closes
    ]
    [incident] = mon.incidents
    assert (incident.kind, incident.onset_step, incident.end_step) == ("nonfinite", 200, 202)
    assert (incident.action, incident.status, incident.transient) == ("rollback", "closed", True)


def test_extreme_grad_norm_skips_the_step() -> None:
    rng = random.Random(1)
    grads = [1.0 + rng.gauss(0, 0.05) for _ in range(300)]
    grads[150] = 40.0
    got = _feed(Monitor(), falling_curve(300), grads)
    assert got[0] == (150, "skip_step", "spike", "grad_norm")


def test_slow_divergence_rolls_back_near_its_onset() -> None:
    rng = random.Random(1)
    xs = [3.0 + rng.gauss(0, 0.03) + (0.004 * (t - 300) if t > 300 else 0.0) for t in range(600)]
    mon = Monitor()
    got = _feed(mon, xs)
    assert got[0][1:3] == ("rollback", "divergence")
    assert 300 < got[0][0] < 460
    incident = mon.incidents[0]
    assert 250 <= incident.onset_step <= 320


def test_rewinding_state_replays_identically() -> None:
    xs = falling_curve(600, seed=9)
    xs[400] += 2.0
    xs[500:] = [x + 1.0 for x in xs[500:]]
    mon = Monitor()
    _feed(mon, xs[:350])
    saved = mon.state_dict()
    first = [mon.observe(StepRecord(run="run", step=s, loss=xs[s])) for s in range(350, 600)]
    mon.load_state_dict(saved)
    second = [mon.observe(StepRecord(run="run", step=s, loss=xs[s])) for s in range(350, 600)]
    assert first == second
    assert any(d.action == "rollback" for ds in first for d in ds)


def test_flush_confirms_a_spike_at_the_end_of_the_data() -> None:
    xs = falling_curve(300)
    xs[297] += 3.0
    mon = Monitor()
    _feed(mon, xs)
    assert mon.incidents[0].status == "open"
    mon.flush()
    inc = mon.incidents[0]
    assert (inc.status, inc.peak_step, inc.end_step, inc.transient) == ("closed", 297, 297, True)


def test_config_threshold_changes_sensitivity() -> None:
    xs = falling_curve(300, seed=2)
    xs[200] += 0.35  # about 10 sigma of the 0.03 noise
    assert _feed(Monitor(), list(xs))[0][0] == 200
    assert _feed(Monitor(config=MonitorConfig(threshold=20.0)), list(xs)) == []
