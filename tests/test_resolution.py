"""Rounded logs: a change the log cannot resolve is never a spike, a shift or a rollback."""

from __future__ import annotations

import json
import math
import random

import pytest

from spikewatch.detectors.robust import RobustSpikeDetector
from spikewatch.replay.analyze import analyze
from spikewatch.replay.model import Curve


def tiny_loss(n: int, *, seed: int, jump_at: int | None = None) -> list[float]:
    """A loss of ~1e-4 with 30 % noise, rounded to 4 decimals as the HF Trainer logs it."""
    rng = random.Random(seed)
    out = []
    for t in range(n):
        x = 1e-4 * (1.0 + 0.3 * rng.gauss(0, 1))
        if t == jump_at:
            x *= 10.0
        out.append(round(x, 4))
    return out


def curve(loss: list[float], grads: list[float | None] | None = None) -> Curve:
    return Curve(path="x.csv", format="csv", steps=list(range(len(loss))), loss=loss,
                 grad_norm=grads)  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_healthy_tiny_rounded_loss_raises_nothing(seed: int) -> None:
    loss = tiny_loss(600, seed=seed)
    assert len(set(loss)) > 1  # the rounding leaves a few 0.0002 (and 0.0) steps
    assert analyze(curve(loss)).events == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_real_jump_of_a_tiny_rounded_loss_is_one_event(seed: int) -> None:
    report = analyze(curve(tiny_loss(600, seed=seed, jump_at=400)))
    assert [(e.kind, e.onset_step, e.action) for e in report.events] == [("spike", 400, "watch")]


def test_a_converged_rounded_loss_ending_one_step_up_is_left_alone() -> None:
    # The Whisper case: a loss decaying to 0.0001 at 4 decimals, 0.0002 at the last step.
    loss = [round(0.5 * 0.99**t + 1e-4, 4) for t in range(1500)]
    loss[-1] = 0.0002
    report = analyze(curve(loss))
    assert report.events == []


def test_a_grad_norm_printed_to_two_decimals_raises_nothing() -> None:
    rng = random.Random(5)  # the llm.c case: ~0.25 +- 0.003, printed with %.2f
    grads: list[float | None] = [round(0.25 + rng.gauss(0, 0.004), 2) for _ in range(2000)]
    loss = [round(3.0 + rng.gauss(0, 0.02), 4) for _ in range(2000)]
    report = analyze(curve(loss, grads))
    assert [e for e in report.events if e.metric == "grad_norm"] == []


def test_a_loss_at_plus_minus_one_quantum_is_not_spiky() -> None:
    rng = random.Random(6)  # a policy-gradient loss that sits at +-0.0001
    loss = [round(rng.gauss(0, 6e-5), 4) for _ in range(3000)]
    assert analyze(curve(loss)).events == []


def test_a_real_jump_of_a_two_decimal_grad_norm_still_skips() -> None:
    rng = random.Random(7)
    grads: list[float | None] = [round(0.25 + rng.gauss(0, 0.004), 2) for _ in range(400)]
    grads[300] = 4.0
    loss = [3.0 + rng.gauss(0, 0.02) for _ in range(400)]
    report = analyze(curve(loss, grads))
    assert [(e.metric, e.onset_step, e.action) for e in report.events] == [
        ("grad_norm", 300, "skip_step")
    ]


def test_resolution_is_the_smallest_step_between_accepted_values() -> None:
    det = RobustSpikeDetector(warmup=0)
    assert det.resolution == 0.0  # unknown until two distinct values were seen
    for x in [0.5, 0.5, 0.5]:
        det.update(x)
    assert det.resolution == 0.0
    for x in [0.52, 0.49, 0.5]:
        det.update(x)
    assert det.resolution == pytest.approx(0.01)


def test_resolution_survives_a_save_and_load() -> None:
    det = RobustSpikeDetector(warmup=0)
    for x in tiny_loss(200, seed=3):
        det.update(x)
    state = json.loads(json.dumps(det.state_dict()))
    again = RobustSpikeDetector(warmup=0)
    again.load_state_dict(state)
    assert again.resolution == det.resolution == pytest.approx(1e-4)
    for x in [0.0002, 0.0001, 0.0009, 0.0001]:
        assert (again.update(x), again.score) == (det.update(x), det.score)


def test_a_state_saved_before_resolution_existed_still_loads() -> None:
    det = RobustSpikeDetector()
    state = det.state_dict()
    del state["resolution"]
    det.load_state_dict(state)
    assert det.resolution == 0.0


def test_within_one_quantum_is_never_a_spike_even_at_a_low_threshold() -> None:
    det = RobustSpikeDetector(warmup=0, threshold=0.5, min_rise=0.0)
    stream = [0.0001, 0.0002] + [0.0001] * 60 + [0.0002]
    assert [t for t, x in enumerate(stream) if det.update(x)] == []
    assert math.isfinite(det.score) and det.score <= 2.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_one_quantum_step_up_is_no_divergence(seed: int) -> None:
    # The loss moves from 0.0001 to 0.0002 for good: one step of the 4-decimal log.
    rng = random.Random(seed)
    loss = [round((1e-4 if t < 300 else 2e-4) + rng.gauss(0, 2e-5), 4) for t in range(900)]
    assert analyze(curve(loss)).decisions == []


@pytest.mark.parametrize("seed", [2, 4, 10])
@pytest.mark.parametrize("ramp", [50, 150])
def test_a_one_quantum_ramp_up_is_no_divergence(seed: int, ramp: int) -> None:
    # Page-Hinkley sees z of 2 for every 0.0002 while the median is still at 0.0001.
    rng = random.Random(seed)
    loss = [
        round(1e-4 + 1e-4 * min(max(t - 300, 0) / ramp, 1.0) + rng.gauss(0, 3e-5), 4)
        for t in range(900)
    ]
    assert analyze(curve(loss)).decisions == []


def test_a_repeated_value_says_its_resolution_by_its_decimals() -> None:
    # 300 steps of exactly 0.0001, then 0.0002 for good: no step was ever seen, but
    # 0.0001 was printed with 4 decimals, so one step up is within the resolution.
    loss = [0.0001] * 300 + [0.0002] * 300
    assert analyze(curve(loss)).decisions == []
    # A whole number says nothing: a jump from a constant 3.0 is still a spike.
    assert [d.step for d in analyze(curve([3.0] * 300 + [4.0] + [3.0] * 20)).decisions] == [
        300,
        308,
    ]
