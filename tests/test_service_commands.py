"""Commands through the HTTP API: a spiking run's rollback, acks, retries, approval, halt.

The trainer side is played by plain requests, as the trainer-side client sends them:
batches of 100 records with a client id and a sequence number, acks of applied
commands, and ``rewind_to`` after a rollback.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service_client import AUTH, HEALTHY, ONSET, RUN, SPIKING, TOKEN, Trainer, metric
from spikewatch.service.config import ServiceConfig
from spikewatch.service.core import Service


def make_trainer(tmp_path: Path, **config: Any) -> Iterator[Trainer]:
    service = Service(ServiceConfig(db=str(tmp_path / "events.db"), **config), token=TOKEN)
    yield Trainer(service)
    service.stop()


@pytest.fixture
def trainer(tmp_path: Path) -> Iterator[Trainer]:
    yield from make_trainer(tmp_path)


@pytest.fixture
def manual(tmp_path: Path) -> Iterator[Trainer]:
    yield from make_trainer(tmp_path, approval="manual")


def scraped(trainer: Trainer, name: str, **labels: str) -> float:
    return metric(trainer.client.get("/metrics").text, name, **labels)


def commands_sent(answers: list[dict[str, Any]]) -> list[list[tuple[str, str]]]:
    return [[(c["action"], c["id"]) for c in a["commands"]] for a in answers]


# -- a spiking run: rollback, ack, rewind ------------------------------------------------
def test_a_spiking_run_gets_a_rollback_until_it_acks(trainer: Trainer) -> None:
    trainer.spike(batches=8)
    sent = commands_sent(trainer.answers)
    assert sent[:5] == [[]] * 5  # healthy: nothing to do
    ((action, cid),) = sent[5]  # the batch holding the jump
    assert action == "rollback"
    assert sent[6:] == [[(action, cid)]] * 2  # re-sent until acknowledged
    cmd = trainer.answers[5]["commands"][0]
    assert cmd["rollback_before_step"] < ONSET <= cmd["issued_step"] < 600
    assert cmd["skip_ahead"] > 0
    (incident,) = trainer.client.get(f"/v1/runs/{RUN}/incidents").json()["incidents"]
    assert (incident["onset_step"], incident["action"]) == (ONSET, "rollback")
    assert incident["id"] == cmd["incident"]


@pytest.mark.parametrize("same_request", [True, False], ids=["ack+rewind", "ack-then-rewind"])
def test_an_acked_rollback_is_applied_and_counted(trainer: Trainer, same_request: bool) -> None:
    trainer.spike()
    cmd = trainer.answers[-1]["commands"][0]
    restart = cmd["rollback_before_step"] + 1  # the trainer restored a state at or before it
    if same_request:
        trainer.send(HEALTHY, restart, restart + 100, acks=[cmd["id"]], rewind_to=restart)
    else:
        assert trainer.send(HEALTHY, 0, 0, acks=[cmd["id"]])["commands"] == []
        trainer.send(HEALTHY, restart, restart + 100, rewind_to=restart)
    assert trainer.answers[-1]["commands"] == []
    view = trainer.view()
    (stored,) = view["commands"]
    assert (stored["id"], stored["status"]) == (cmd["id"], "applied")
    # Skipped: the batches since the restored state (restart..599) and those skipped ahead.
    skipped = 600 - restart + cmd["skip_ahead"]
    assert (view["rollbacks"], view["skipped_batches"]) == (1, skipped)
    assert (view["last_step"], view["records"]) == (restart + 99, 700)
    labels = {"run": RUN}
    assert scraped(trainer, "spikewatch_rollbacks_total", **labels) == 1
    assert scraped(trainer, "spikewatch_skipped_batches_total", **labels) == skipped
    assert scraped(trainer, "spikewatch_records_total", **labels) == 700


def test_acks_are_idempotent(trainer: Trainer) -> None:
    trainer.spike()
    cid = trainer.answers[-1]["commands"][0]["id"]
    for _ in range(3):
        trainer.send(HEALTHY, 0, 0, acks=[cid, "no-such-command"])
    assert trainer.view()["rollbacks"] == 1


def test_a_retried_batch_is_not_ingested_twice(trainer: Trainer) -> None:
    trainer.send(HEALTHY, 0, 100)
    trainer.send(HEALTHY, 100, 200)
    trainer.seq -= 1  # the answer was lost: the client sends the same batch again
    again = trainer.send(HEALTHY, 100, 200)
    assert (again["duplicate"], again["accepted"]) == (True, 0)
    trainer.seq -= 2  # an even older one
    assert trainer.send(HEALTHY, 0, 100)["duplicate"] is True
    assert trainer.answers[1]["duplicate"] is False
    assert (trainer.view()["records"], trainer.view()["last_step"]) == (200, 199)
    assert scraped(trainer, "spikewatch_records_total", run=RUN) == 200


# -- manual approval -------------------------------------------------------------------
def proposed(trainer: Trainer) -> dict[str, Any]:
    (cmd,) = [c for c in trainer.view()["commands"] if c["action"] == "rollback"]
    return dict(cmd)


def test_manual_approval_holds_the_rollback_as_proposed(manual: Trainer) -> None:
    manual.spike(batches=8)
    assert commands_sent(manual.answers) == [[]] * 8
    assert proposed(manual)["status"] == "proposed"


def test_an_approved_rollback_is_sent(manual: Trainer) -> None:
    manual.spike()
    cid = proposed(manual)["id"]
    answer = manual.command(action="approve", command=cid)
    assert answer.status_code == 200
    assert answer.json()["command"]["status"] == "pending"
    assert commands_sent([manual.send(SPIKING, 600, 700)]) == [[("rollback", cid)]]
    assert manual.command(action="approve", command=cid).status_code == 409  # not proposed now


def test_a_vetoed_rollback_is_never_sent(manual: Trainer) -> None:
    manual.spike()
    cid = proposed(manual)["id"]
    assert manual.command(action="veto", command=cid, reason="known bad shard").status_code == 200
    for start in (600, 700, 800):
        manual.send(SPIKING, start, start + 100)
    assert all(cid not in str(a["commands"]) for a in manual.answers)
    assert proposed(manual)["status"] == "vetoed"
    again = manual.command(action="approve", command=cid)
    assert again.status_code == 409
    assert "vetoed" in again.json()["error"]


@pytest.mark.parametrize("action", ["approve", "veto"])
def test_deciding_an_unknown_command_is_404(manual: Trainer, action: str) -> None:
    manual.send(HEALTHY, 0, 100)
    answer = manual.command(action=action, command="0123456789abcdef")
    assert answer.status_code == 404
    assert "0123456789abcdef" in answer.json()["error"]
    assert manual.command(action=action).status_code == 422  # no command id at all


# -- halt and resume -------------------------------------------------------------------
def test_an_operator_halt_is_delivered_and_a_resume_withdraws_it(trainer: Trainer) -> None:
    trainer.send(HEALTHY, 0, 100)
    halt = trainer.command(action="halt", reason="bad data shard")
    assert (halt.status_code, halt.json()["run"]) == (200, "halted")
    assert trainer.view()["state"] == "halted"
    answer = trainer.send(HEALTHY, 100, 200)
    assert answer["halted"] is True
    ((action, cid),) = commands_sent([answer])[0]
    assert action == "halt"
    assert "bad data shard" in answer["commands"][0]["reason"]
    assert scraped(trainer, "spikewatch_run_state", run=RUN, state="halted") == 1

    resume = trainer.command(action="resume")
    assert (resume.status_code, resume.json()["run"]) == (200, "active")
    assert trainer.view()["state"] == "active"
    answer = trainer.send(HEALTHY, 200, 300)
    assert (answer["halted"], answer["commands"]) == (False, [])
    statuses = {c["id"]: c["status"] for c in trainer.view()["commands"]}
    assert statuses[cid] == "withdrawn"


def test_an_operator_rollback_needs_a_step_and_is_delivered(trainer: Trainer) -> None:
    trainer.send(HEALTHY, 0, 200)
    missing = trainer.command(action="rollback")
    assert missing.status_code == 422
    assert "rollback_before_step" in missing.json()["error"]
    made = trainer.command(action="rollback", rollback_before_step=120, skip_ahead=10)
    assert made.status_code == 200
    (cmd,) = trainer.send(HEALTHY, 200, 210)["commands"]
    assert (cmd["action"], cmd["rollback_before_step"], cmd["skip_ahead"]) == ("rollback", 120, 10)
    assert cmd["source"] == "operator"


# -- a store that fails for a while ----------------------------------------------------
class BrokenStore:
    """Every call fails as SQLite does when the disk goes away."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

        return fail


def test_a_passing_store_failure_is_503_and_loses_nothing(
    trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer.send(HEALTHY, 0, 100)
    registry = trainer.service.registry
    with monkeypatch.context() as broken:
        broken.setattr(registry, "store", BrokenStore())
        body = {"records": [{"step": 100, "loss": HEALTHY[100]}], "client": "trainer-1", "seq": 1}
        answer = trainer.client.post(f"/v1/runs/{RUN}/records", json=body, headers=AUTH)
        assert answer.status_code == 503
        assert "retry later" in answer.json()["error"]
    # The disk is back: the run is still known, and the retry continues it.
    still = trainer.client.get(f"/v1/runs/{RUN}")
    assert still.status_code == 200, "the run was forgotten after one failed write"
    assert (still.json()["records"], still.json()["last_step"]) == (100, 99)
    trainer.send(HEALTHY, 100, 200)
    assert (trainer.view()["records"], trainer.view()["last_step"]) == (200, 199)
