from __future__ import annotations

import json
import math
import re

import pytest

from spikewatch.errors import WireFormatError
from spikewatch.records import Command, Decision, Signal, StepRecord


def _signal() -> Signal:
    return Signal(
        run="r",
        kind="level_shift",
        metric="loss",
        step=40,
        value=5.0,
        score=11.0,
        baseline=2.0,
        onset_step=30,
        peak_step=31,
        end_step=None,
        transient=False,
        shift=3.0,
        stage="confirmed",
        incident="loss-spike-30",
    )


@pytest.mark.parametrize(
    "obj",
    [
        StepRecord(
            run="a", step=1, loss=2.5, grad_norm=0.5, lr=1e-3, data_position=9, wall_time=1.7e9
        ),
        StepRecord(run="a", step=2, loss=float("inf")),
        _signal(),
        Decision(
            run="r",
            step=40,
            action="rollback",
            reason="x",
            signal=_signal(),
            rollback_before_step=20,
            lr_factor=0.5,
            escalation=1,
        ),
        Command(
            run="r", id="c1", action="rollback", reason="x", issued_step=41, rollback_before_step=20
        ),
    ],
)
def test_json_round_trip(obj: StepRecord | Signal | Decision | Command) -> None:
    text = json.dumps(obj.to_json())
    assert type(obj).from_json(json.loads(text)) == obj


def test_nan_loss_survives_json() -> None:
    rec = StepRecord.from_json(json.loads('{"run": "a", "step": 3, "loss": NaN}'))
    assert math.isnan(rec.loss)
    assert rec.grad_norm is None


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"run": "a", "step": 1, "loss": "high"}, "StepRecord.loss='high' is invalid"),
        ({"run": "a", "step": 1.5, "loss": 1.0}, "StepRecord.step=1.5 is invalid"),
        ({"run": "a", "step": True, "loss": 1.0}, "StepRecord.step=True is invalid"),
        ({"run": "a", "loss": 1.0}, "StepRecord.step is missing"),
        ({"run": 3, "step": 1, "loss": 1.0}, "StepRecord.run=3 is invalid: expected a string"),
        ([1, 2], "StepRecord must be a JSON object, got list"),
    ],
)
def test_bad_record_names_the_field(payload: object, message: str) -> None:
    with pytest.raises(WireFormatError, match=re.escape(message)):
        StepRecord.from_json(payload)


def test_bad_action_lists_the_choices() -> None:
    data = Command(run="r", id="1", action="halt", reason="", issued_step=1).to_json()
    data["action"] = "panic"
    with pytest.raises(WireFormatError, match="one of skip_step, rollback, halt, resume"):
        Command.from_json(data)


def test_signal_kind_is_checked() -> None:
    data = _signal().to_json()
    data["kind"] = "blip"
    with pytest.raises(WireFormatError, match=re.escape("Signal.kind='blip'")):
        Signal.from_json(data)
