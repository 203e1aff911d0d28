from __future__ import annotations

import pytest

from spikewatch.errors import ConfigError
from spikewatch.policy import Policy, PolicyConfig
from spikewatch.records import Metric, Signal, SignalKind


def sig(
    kind: SignalKind,
    step: int,
    *,
    onset: int | None = None,
    metric: Metric = "loss",
    value: float = 9.0,
    baseline: float = 3.0,
    transient: bool | None = None,
    confirmed: bool = True,
) -> Signal:
    return Signal(
        run="r",
        kind=kind,
        metric=metric,
        step=step,
        value=value,
        score=10.0,
        baseline=baseline,
        onset_step=step if onset is None else onset,
        peak_step=step,
        transient=transient,
        stage="confirmed" if confirmed else "streaming",
    )


def test_transient_spike_is_watched() -> None:
    policy = Policy()
    assert policy.decide(sig("spike", 100, confirmed=False)).action == "watch"
    assert policy.decide(sig("spike", 108, transient=True)).action == "watch"
    assert policy.rollbacks == 0


def test_nonfinite_skips_then_rolls_back_when_it_keeps_coming() -> None:
    policy = Policy(PolicyConfig(nonfinite_rollback_after=3, margin=10))
    actions = [
        policy.decide(sig("nonfinite", s, onset=500, confirmed=False)).action
        for s in (500, 501, 502)
    ]
    assert actions == ["skip_step", "skip_step", "rollback"]


def test_grad_norm_skips_only_when_extreme() -> None:
    policy = Policy(PolicyConfig(extreme_grad_ratio=10.0))
    mild = sig("spike", 5, metric="grad_norm", value=5.0, baseline=1.0, confirmed=False)
    wild = sig("spike", 6, metric="grad_norm", value=50.0, baseline=1.0, confirmed=False)
    assert policy.decide(mild).action == "watch"
    decision = policy.decide(wild)
    assert decision.action == "skip_step"
    assert "50.0x" in decision.reason


def test_grad_norm_level_shift_is_never_a_rollback() -> None:
    shift = sig("level_shift", 900, metric="grad_norm", transient=False)
    assert Policy().decide(shift).action == "watch"


def test_rollback_goes_margin_before_the_onset() -> None:
    d = Policy(PolicyConfig(margin=100)).decide(
        sig("level_shift", 1040, onset=1010, transient=False)
    )
    assert (d.action, d.rollback_before_step, d.lr_factor, d.escalation) == (
        "rollback",
        910,
        1.0,
        0,
    )


def test_recurring_trouble_escalates_then_halts() -> None:
    policy = Policy(PolicyConfig(margin=100, recurrence_steps=500, max_escalation=2))
    got = []
    for step in (1000, 1100, 1200, 1300):
        d = policy.decide(sig("level_shift", step, transient=False))
        got.append((d.action, d.rollback_before_step, d.lr_factor, d.escalation))
    assert got == [
        ("rollback", 900, 1.0, 0),
        ("rollback", 900, 0.5, 1),
        ("rollback", 800, 0.25, 2),
        ("halt", None, 1.0, 3),
    ]
    assert policy.halted
    assert policy.decide(sig("spike", 1400, transient=True)).action == "halt"
    policy.resume()
    assert policy.decide(sig("spike", 1500, transient=True)).action == "watch"


def test_budget_counts_rollbacks_in_a_sliding_window() -> None:
    policy = Policy(PolicyConfig(max_rollbacks=2, budget_steps=1000, recurrence_steps=0))
    steps = [1000, 3000, 3500, 3600]
    decisions = [policy.decide(sig("divergence", s, transient=False)) for s in steps]
    assert [d.action for d in decisions] == ["rollback", "rollback", "rollback", "halt"]
    assert "2 rollbacks in 1000 steps" in decisions[-1].reason
    assert "halted earlier" in policy.decide(sig("divergence", 9000)).reason


def test_halt_reason_says_what_to_try() -> None:
    policy = Policy(PolicyConfig(max_rollbacks=0))
    d = policy.decide(sig("divergence", 10, transient=False))
    assert d.action == "halt"
    assert "lower the learning rate" in d.reason


def test_rollback_target_is_never_negative() -> None:
    d = Policy().decide(sig("divergence", 30, onset=20, transient=False))
    assert d.rollback_before_step == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"margin": -1}, "margin=-1 is invalid: use an integer >= 0"),
        ({"lr_cut": 0.0}, r"lr_cut=0.0 is invalid: use a factor in \(0, 1\]"),
        ({"extreme_grad_ratio": 0.5}, "extreme_grad_ratio=0.5 is invalid"),
        ({"budget_steps": 0}, "budget_steps=0 is invalid"),
    ],
)
def test_bad_policy_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PolicyConfig(**kwargs)  # type: ignore[arg-type]
