"""The service's side of service mode: a trainer that decides reports, the service records.

Drives the real `RunRegistry`, `Operator` and HTTP app in-process on a SQLite store.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from spikewatch.forensics import Verdict
from spikewatch.monitor import Monitor
from spikewatch.records import Decision, StepRecord
from spikewatch.service.app import create_app
from spikewatch.service.config import ServiceConfig
from spikewatch.service.core import Service
from spikewatch.service.operator import Operator, OperatorError
from spikewatch.service.payloads import parse_ingest
from spikewatch.service.registry import RunRegistry
from spikewatch.service.run import MirrorMonitor
from spikewatch.service.store import EventStore

TOKEN = "trainer-reports-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _records(start: int, stop: int, *, nan_at: int | None = None) -> list[dict[str, Any]]:
    return [
        {"step": t, "loss": math.nan if t == nan_at else 3.0 - 0.001 * t, "grad_norm": 1.0}
        for t in range(start, stop)
    ]


def _trainer_decisions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the trainer's own monitor decides on these records."""
    monitor = Monitor(run="r")
    return [
        d.to_json()
        for r in records
        for d in monitor.observe(StepRecord(run="r", **r))
        if d.action != "watch"
    ]


def _ingest(reg: RunRegistry, body: dict[str, Any]) -> dict[str, Any]:
    raw = json.dumps(body).encode()
    return reg.ingest("r", parse_ingest(json.loads(raw), "r", max_records=10_000), raw)


def test_the_trainers_decisions_are_kept_and_the_service_decides_nothing(tmp_path: Path) -> None:
    reg = RunRegistry(EventStore(tmp_path / "e.db"), ServiceConfig())
    records = _records(0, 120, nan_at=100)
    decisions = _trainer_decisions(records)
    assert {d["action"] for d in decisions} == {"skip_step"}
    answer = _ingest(reg, {"records": records, "decisions": decisions, "seq": 1, "client": "c"})
    status = reg.status("r")
    assert status is not None
    assert (status.decides, status.skipped_steps, status.signals["nonfinite"]) == (
        "trainer", 1, len(decisions)
    )  # fmt: skip
    assert answer["commands"] == [] and answer["vetoed"] == []
    stored = reg.store.incidents("r")
    assert {i["action"] for i in stored} == {"skip_step"} and len(stored) == len(decisions)
    # A NaN the trainer did not report is the trainer's business: no decision, no command.
    _ingest(reg, {"records": _records(120, 130, nan_at=125), "decisions": [], "seq": 2})
    assert reg.status("r").skipped_steps == 1  # type: ignore[union-attr]
    assert not reg.runs["r"].commands


def test_a_restart_keeps_the_run_in_trainer_mode(tmp_path: Path) -> None:
    reg = RunRegistry(EventStore(tmp_path / "e.db"), ServiceConfig())
    _ingest(reg, {"records": _records(0, 60), "decisions": [], "config": {"window": 50}})
    again = RunRegistry(EventStore(tmp_path / "e.db"), ServiceConfig())
    run = again.runs["r"]
    assert run.trainer_decides and isinstance(run.monitor, MirrorMonitor)
    assert run.config == {"window": 50}


def _proposal_body(step: int, proposal: str) -> dict[str, Any]:
    decision = Decision(run="r", step=step, action="rollback", reason="loss jumped",
                        rollback_before_step=step - 30, skip_ahead=40)  # fmt: skip
    event = {"event": "proposed", "proposal": proposal, "decision": decision.to_json()}
    return {"records": [], "decisions": [], "events": [event], "seq": step}


@pytest.mark.parametrize("answer", ["approve", "veto"])
def test_a_proposal_waits_for_an_operator_and_the_answer_reaches_the_trainer(
    tmp_path: Path, answer: str
) -> None:
    reg = RunRegistry(EventStore(tmp_path / "e.db"), ServiceConfig(approval="manual"))
    _ingest(reg, {"records": _records(0, 100), "decisions": [], "seq": 1, "client": "c"})
    _ingest(reg, {**_proposal_body(99, "p1"), "client": "c"})
    assert reg.runs["r"].commands["p1"]["status"] == "proposed"
    Operator(reg).apply("r", action=answer, command="p1")
    reply = _ingest(reg, {"records": _records(100, 101), "decisions": [], "seq": 100})
    if answer == "approve":
        [cmd] = reply["commands"]
        assert (cmd["id"], cmd["action"], cmd["rollback_before_step"]) == ("p1", "rollback", 69)
    else:
        assert reply["commands"] == [] and reply["vetoed"] == ["p1"]
    acked = _ingest(reg, {"records": [], "decisions": [], "acks": ["p1"], "seq": 101})
    assert acked["commands"] == [] and acked["vetoed"] == []
    assert reg.runs["r"].commands["p1"]["status"] == (
        "applied" if answer == "approve" else "vetoed"
    )


def test_an_operator_rollback_the_trainer_cannot_reach_is_refused_at_once(tmp_path: Path) -> None:
    reg = RunRegistry(EventStore(tmp_path / "e.db"), ServiceConfig())
    _ingest(reg, {"records": _records(0, 500), "decisions": [], "restorable": [200, 300, 400]})
    with pytest.raises(OperatorError, match=r"no snapshot at or before step 150") as info:
        Operator(reg).apply("r", action="rollback", rollback_before_step=150)
    assert info.value.status == 409
    ok = Operator(reg).apply("r", action="rollback", rollback_before_step=350)
    assert ok["command"]["status"] == "pending"


def test_the_service_hands_a_starting_trainer_its_settings(tmp_path: Path) -> None:
    config = ServiceConfig.from_mapping(
        {"service": {"db": str(tmp_path / "e.db"), "approval": "manual",
                     "approval_timeout_s": 60}, "monitor": {"policy": {"margin": 40}}}
    )  # fmt: skip
    service = Service(config, token=TOKEN)
    client = TestClient(create_app(service), raise_server_exceptions=False)
    answer = client.get("/v1/runs/gpt/config", headers=AUTH)
    assert client.get("/v1/runs/gpt/config").status_code == 401
    service.stop()
    assert answer.status_code == 200
    body = answer.json()
    assert body["monitor"]["policy"]["margin"] == 40
    assert body["approval"] == {"mode": "manual", "timeout_s": 60.0, "default": "veto"}


_VERDICT = Verdict(cause="data", incident="loss-spike-500", step=515, onset_step=500).to_json()
_ROLLBACK = Decision(run="r", step=515, action="rollback", reason="loss jumped").to_json()


def _verdict_event(**changes: Any) -> dict[str, Any]:
    return {"event": "verdict", "verdict": _VERDICT, "decision": _ROLLBACK, **changes}


#: Verdict events the ingest refuses, and the field its 422 names.
_BAD_VERDICTS: list[tuple[dict[str, Any], str]] = [
    ({"event": "verdict", "decision": _ROLLBACK}, "events[0].verdict"),
    (_verdict_event(verdict=[_VERDICT]), "events[0].verdict"),
    (_verdict_event(verdict={**_VERDICT, "cause": "cosmic rays"}), "events[0].verdict.cause"),
    (_verdict_event(verdict={**_VERDICT, "step": "515"}), "events[0].verdict.step"),
    (_verdict_event(verdict={**_VERDICT, "step": 2**64}), "events[0].verdict.step"),
    (_verdict_event(verdict={**_VERDICT, "why": "x" * 10_001}), "events[0].verdict.why"),
    (_verdict_event(verdict={**_VERDICT, "samples": [{"index": 3}]}), "events[0].verdict.samples"),
    (_verdict_event(verdict={**_VERDICT, "colour": "red"}), "events[0].verdict.colour"),
    (
        _verdict_event(verdict={k: v for k, v in _VERDICT.items() if k != "incident"}),
        "events[0].verdict.incident",
    ),
    (_verdict_event(decision={"action": "explode"}), "events[0].decision"),
]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"decisions": [{"action": "explode"}]}, "decisions[0]"),
        ({"decisions": [], "events": [{"event": "party"}]}, "events[0]"),
        (
            {"decisions": [], "events": [{"event": "proposed", "proposal": "p"}]},
            "events[0].decision",
        ),
        ({"decisions": [], "restorable": ["x"]}, "restorable"),
        ({"restorable": [1]}, "decisions"),
        *[({"decisions": [], "events": [event]}, field) for event, field in _BAD_VERDICTS],
    ],
)
def test_a_bad_report_is_a_422_naming_the_field(
    tmp_path: Path, extra: dict[str, Any], field: str
) -> None:
    service = Service(ServiceConfig(db=str(tmp_path / "e.db")), token=TOKEN)
    client = TestClient(create_app(service), raise_server_exceptions=False)
    body = json.dumps({"records": _records(0, 2), **extra})
    answer = client.post("/v1/runs/r/records", content=body, headers=AUTH)
    service.stop()
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
