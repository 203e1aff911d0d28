"""The verdict from the probe's numbers, and what the monitor and policy do with it."""

from __future__ import annotations

import dataclasses
import math

import pytest

from spikewatch.errors import ConfigError, WireFormatError
from spikewatch.forensics.judge import BatchLoss, judge
from spikewatch.forensics.verdict import ForensicsConfig, Verdict
from spikewatch.monitor import Monitor
from spikewatch.policy import PolicyConfig
from spikewatch.records import Decision, Signal
from spikewatch.settings import MonitorConfig

CFG = ForensicsConfig()
REF = [BatchLoss(p, 2.0 + 0.02 * ((p * 7) % 5), [(p * 10 + k, 2.0 + 0.05 * k) for k in range(4)])
       for p in range(8)]  # fmt: skip


def verdict(suspect: list[BatchLoss], reference: list[BatchLoss] = REF) -> Verdict:
    return judge(suspect, reference, CFG, incident="loss-spike-40", step=50, onset_step=40)


def test_outlying_batches_and_samples_are_data() -> None:
    suspect = [BatchLoss(40, 2.03, [(400, 2.0), (401, 2.1)]),
               BatchLoss(41, 3.9, [(410, 2.05), (411, 5.6)])]  # fmt: skip
    v = verdict(suspect)
    assert v.cause == "data" and v.outlier_positions == [41]
    assert v.samples == [{"position": 41, "index": 411, "loss": 5.6}]
    assert v.suspect_loss == pytest.approx((2.03 + 3.9) / 2) and v.reference_loss == 2.04


def test_one_bad_sample_in_an_ordinary_batch_is_still_data() -> None:
    suspect = [BatchLoss(40, 2.2, [(400, 2.0), (401, 2.1), (402, 2.0), (403, 6.0)])]
    v = verdict(suspect)
    assert v.cause == "data" and v.outlier_positions == [] and v.samples[0]["index"] == 403


def test_ordinary_suspects_are_state_and_a_mild_rise_is_unknown() -> None:
    assert verdict([BatchLoss(40, 2.05), BatchLoss(41, 2.0)]).cause == "state"
    mild = verdict([BatchLoss(40, 2.4), BatchLoss(41, 2.45)])
    assert mild.cause == "unknown" and "not clearly" in mild.why


def test_a_non_finite_loss_from_the_healthy_state_blames_the_data() -> None:
    v = verdict([BatchLoss(40, math.inf, [(400, math.inf), (401, 2.0)])])
    assert v.cause == "data" and [s["index"] for s in v.samples] == [400]


def test_too_few_references_is_unknown_and_says_what_was_missing() -> None:
    v = verdict([BatchLoss(40, 9.0)], reference=REF[:1])
    assert v.cause == "unknown"
    assert "1 reference" in v.why and "2 needed" in v.why


def test_heavy_tailed_per_sample_losses_do_not_name_ordinary_samples() -> None:
    # squared errors: ordinary samples reach 10x the median; corrupted ones 1000x
    ref = [BatchLoss(p, 1.0, [(None, v) for v in (0.05, 0.3, 0.3, 0.5, 1.0, 2.5, 4.0)])
           for p in range(8)]  # fmt: skip
    suspect = [BatchLoss(40, 200.0, [(1, 0.2), (2, 9.0), (3, 1500.0), (4, 6.0)])]
    v = verdict(suspect, ref)
    assert [s["index"] for s in v.samples] == [3]


def test_verdict_json_round_trip_and_errors() -> None:
    v = verdict([BatchLoss(40, 5.0, [(400, 9.0)])])
    assert Verdict.from_json(v.to_json()) == v
    with pytest.raises(WireFormatError, match=r"verdict\.cause='bad'"):
        Verdict.from_json({**v.to_json(), "cause": "bad"})
    with pytest.raises(WireFormatError, match=r"verdict\.extra is not a verdict field"):
        Verdict.from_json({**v.to_json(), "extra": 1})
    assert v.summary()["cause"] == "data" and set(v.summary()) >= {
        "cause", "suspect_positions", "suspect_loss", "reference_loss", "samples",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_suspect", 0, "forensics.max_suspect=0 is invalid"),
        ("state_ratio", 2.0, "state_ratio=2.0 is invalid: use a value <= forensics.batch_ratio"),
        ("enabled", "yes", "forensics.enabled='yes' is invalid: use true or false"),
        ("max_seconds", 0, "forensics.max_seconds=0 is invalid"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ForensicsConfig(**{field: value})  # type: ignore[arg-type]


def test_settings_come_from_a_mapping_and_typos_are_errors() -> None:
    cfg = MonitorConfig.from_mapping({"forensics": {"on_state": "halt", "max_suspect": 8}})
    assert cfg.forensics.on_state == "halt" and cfg.forensics.max_suspect == 8
    with pytest.raises(ConfigError, match="unknown setting 'on_sate' in forensics"):
        MonitorConfig.from_mapping({"forensics": {"on_sate": "halt"}})
    assert MonitorConfig.from_mapping(dataclasses.asdict(cfg)) == cfg


def _rolled_back(monitor: Monitor, onset: int = 300) -> Decision:
    signal = Signal(run="r", kind="level_shift", metric="loss", step=onset + 15, value=9.0,
                    score=12.0, baseline=3.0, onset_step=onset, peak_step=onset + 1,
                    transient=False, stage="confirmed", incident=f"loss-spike-{onset}")  # fmt: skip
    decision = monitor._decide([signal])[0]
    assert decision.action == "rollback"
    return decision


def _state() -> Verdict:
    return Verdict(cause="state", incident="loss-spike-300", step=315, onset_step=300, why="w")


def test_a_state_verdict_cuts_the_lr_on_this_rollback_and_the_incident_keeps_it() -> None:
    monitor = Monitor(run="r")
    decided, kept = monitor.adopt_verdict(_rolled_back(monitor), _state())
    assert (decided.action, decided.lr_factor, decided.escalation) == ("rollback", 0.5, 1)
    assert "forensics: state-caused: lr x0.5 now" in decided.reason
    assert kept.action == "lr x0.5 now"
    incident = monitor.incidents[0]
    assert incident.verdict is not None and incident.verdict["cause"] == "state"
    assert "state-caused" in incident.reason
    # The trouble returns: the policy escalates from the cut forensics made.
    again = _rolled_back(monitor, onset=340)
    assert (again.lr_factor, again.escalation) == (0.25, 2)
    decided, kept = monitor.adopt_verdict(again, dataclasses.replace(_state(), incident="x"))
    assert decided.lr_factor == 0.25 and "already" in kept.action  # no second cut


def test_a_state_verdict_with_the_escalation_spent_halts() -> None:
    monitor = Monitor(run="r", config=MonitorConfig(policy=PolicyConfig(max_escalation=0)))
    decided, kept = monitor.adopt_verdict(_rolled_back(monitor), _state())
    assert decided.action == "halt" and kept.action == "halt" and monitor.policy.halted


@pytest.mark.parametrize(("on_state", "action"), [("halt", "halt"), ("none", "rollback")])
def test_on_state_choices(on_state: str, action: str) -> None:
    config = MonitorConfig(forensics=ForensicsConfig(on_state=on_state))  # type: ignore[arg-type]
    monitor = Monitor(run="r", config=config)
    decided, _ = monitor.adopt_verdict(_rolled_back(monitor), _state())
    assert decided.action == action and decided.lr_factor == 1.0


def test_data_and_unknown_verdicts_keep_the_rollback() -> None:
    monitor = Monitor(run="r")
    decision = _rolled_back(monitor)
    data = dataclasses.replace(_state(), cause="data")
    decided, kept = monitor.adopt_verdict(decision, data)
    assert (decided.action, decided.lr_factor, decided.skip_ahead) == (
        "rollback", 1.0, decision.skip_ahead,
    )  # fmt: skip
    assert kept.action == "skip the batches, quarantine the samples"
    assert decided.reason.endswith("; forensics: data")
