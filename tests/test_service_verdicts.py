"""Forensics verdicts in the service: a real `spikewatch serve` with Slack on the emulator,
fed by the real trainer side of service mode (`ServiceTransport`, `HttpTransport`).

Four runs roll back at the same spike and judge it: ``data`` (twelve bad samples named),
``state`` (the LR is cut at once), ``unknown`` (the probe could not run) and ``state``
with ``on_state = "halt"``. The service keeps each verdict with its incident, counts
it, tells the incident's Slack thread, and keeps all of it through ``kill -9``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from forensics_trainer import BAD_INDICES, Judged, judged_rollback, probe
from service_client import SLACK_TOKEN, SPIKING, delivered, metric, slack_sink, wait_for
from service_process import TOKEN, ServiceProcess
from slack_emulator import Call, SlackEmulator, running_emulator
from spikewatch.forensics import ForensicsConfig, Verdict
from spikewatch.http_transport import HttpTransport
from spikewatch.monitor import Monitor
from spikewatch.records import StepRecord
from spikewatch.service.app import create_app
from spikewatch.service.config import ServiceConfig
from spikewatch.service.core import Service
from spikewatch.service.notify import verdict_notice
from spikewatch.service.report_verdict import CHECKS, verdict_problem
from spikewatch.settings import MonitorConfig
from spikewatch.sinks.slack_verdict import verdict_message

HALT = MonitorConfig(forensics=ForensicsConfig(on_state="halt"))
#: run -> (the cause its probe finds, the trainer's settings)
RUNS: dict[str, tuple[str, MonitorConfig]] = {
    "gpt-data": ("data", MonitorConfig()),
    "gpt-state": ("state", MonitorConfig()),
    "gpt-unknown": ("unknown", MonitorConfig()),
    "gpt-halt": ("state", HALT),
}


@dataclass
class Story:
    service: ServiceProcess
    emulator: SlackEmulator
    judged: dict[str, Judged]


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    with running_emulator(token=SLACK_TOKEN) as emulator:
        config = f'[slack]\nchannel = "#alerts"\nbase_url = "{emulator.url}/api/"\ntimeout_s = 5\n'
        svc = ServiceProcess(
            tmp_path_factory.mktemp("verdicts"), config=config, env={"SLACK_BOT_TOKEN": SLACK_TOKEN}
        )
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            svc.env.pop(name, None)  # slack_sdk would send even loopback requests through one
        with svc:
            judged = {
                run: judged_rollback(svc.url, run, TOKEN, cause=cause, config=config)
                for run, (cause, config) in RUNS.items()
            }
            # Per run: the incident, its verdict, and for gpt-halt the halt.
            wanted = 2 * len(RUNS) + 1
            wait_for(
                lambda: len(emulator.calls_to("chat.postMessage")) >= wanted,
                timeout=30,
                what=f"{wanted} Slack posts\n{svc.log()}",
            )
            yield Story(svc, emulator, judged)


def incident_of(svc: ServiceProcess, run: str, incident: str) -> dict[str, Any]:
    status, body = svc.get(f"/v1/runs/{run}/incidents")
    assert status == 200, body
    [found] = [i for i in body["incidents"] if i["id"] == incident]
    return dict(found)


def as_json(data: Any) -> Any:
    return json.loads(json.dumps(data))  # what comes back over HTTP


@pytest.mark.parametrize("run", RUNS)
def test_the_incident_keeps_the_verdict_and_the_decision_as_it_now_stands(
    story: Story, run: str
) -> None:
    judged = story.judged[run]
    served = incident_of(story.service, run, judged.verdict.incident)
    served.pop("command", None)
    mine = judged.transport.monitor.incident(judged.verdict.incident)
    assert mine is not None
    # The service's copy is the trainer's own incident, verdict and folded decision alike.
    assert served == as_json(mine.to_json())
    assert served["verdict"] == as_json(judged.verdict.to_json())
    assert (served["action"], served["reason"]) == (judged.decided.action, judged.decided.reason)
    assert (
        served["verdict"]["action"]
        == {
            "gpt-data": "skip the batches, quarantine the samples",
            "gpt-state": "lr x0.5 now",
            "gpt-unknown": "rollback as decided",
            "gpt-halt": "halt",
        }[run]
    )


def test_each_run_counts_its_verdicts_by_cause_in_its_view_and_in_metrics(story: Story) -> None:
    _, metrics = story.service.get("/metrics")
    for run, (cause, _) in RUNS.items():
        _, view = story.service.get(f"/v1/runs/{run}")
        assert view["verdicts"] == {cause: 1}
        exported = {c: metric(metrics, "spikewatch_verdicts_total", run=run, cause=c)
                    for c in ("data", "state", "unknown")}  # fmt: skip
        assert exported == {c: float(c == cause) for c in exported}
    _, halted = story.service.get("/v1/runs/gpt-halt")
    assert halted["state"] == "halted"


def threaded(story: Story, run: str, incident: str) -> list[Call]:
    """The posts in the incident's Slack thread, in order (the thread ts from the store)."""
    db = sqlite3.connect(f"{story.service.db.resolve().as_uri()}?mode=ro", uri=True)
    threads = dict(db.execute("SELECT key, ts FROM slack_threads").fetchall())
    db.close()
    ts = threads[f"{run}/{incident}"]
    posts = story.emulator.calls_to("chat.postMessage")
    return [p for p in posts if p.payload.get("thread_ts") == ts]


def section_texts(post: Call) -> list[str]:
    """The mrkdwn of every section, field and context element, in order."""
    out = []
    for block in post.payload["blocks"]:
        if "text" in block:
            out.append(block["text"]["text"])
        out += [f["text"] for f in block.get("fields", []) + block.get("elements", [])]
    return list(map(str, out))


def test_the_verdict_follows_the_incident_into_its_thread_with_the_named_samples(
    story: Story,
) -> None:
    judged = story.judged["gpt-data"]
    [post] = threaded(story, "gpt-data", judged.verdict.incident)
    texts = section_texts(post)
    assert texts[0] == ":mag: *Forensics: bad data*"
    assert "*Cause*\n`data`" in texts
    assert "*Action*\nskip the batches, quarantine the samples" in texts
    assert "*Suspect loss (median)*\n6.8 (x3.4 the reference)" in texts
    assert "*Reference loss (median)*\n2.01" in texts
    # The first ten dataset indices, sorted, and how many more (12 were named).
    first_ten = ", ".join(str(i) for i in BAD_INDICES[:10])
    assert f"*Samples named* (12; dataset indices)\n{first_ten} +2 more" in texts
    assert any(
        t.startswith("*Why*\n2 of 3 suspect batches and 12 samples stand out") for t in texts
    )
    assert texts[-1] == f"incident `{judged.verdict.incident}` · 3 suspect batches probed"
    assert post.payload["text"].startswith("Forensics: bad data. suspect loss 6.8 vs reference")


def test_an_unknown_verdict_says_why_the_probe_could_not_tell(story: Story) -> None:
    judged = story.judged["gpt-unknown"]
    [post] = threaded(story, "gpt-unknown", judged.verdict.incident)
    texts = section_texts(post)
    assert texts[0] == ":grey_question: *Forensics: cause unknown*"
    assert "*Suspect loss (median)*\nn/a" in texts
    assert "*Action*\nrollback as decided" in texts
    assert (
        "*Why the probe could not tell*\ntoo little to compare: 0 suspect and 8 reference "
        "batches probed (at least 1 and 2 needed)"
    ) in texts
    assert not any(t.startswith("*Samples named*") for t in texts)
    assert texts[-1].endswith("· no suspect batch probed")


def test_a_state_verdict_that_halts_is_followed_by_the_halt(story: Story) -> None:
    judged = story.judged["gpt-halt"]
    verdict, halt = threaded(story, "gpt-halt", judged.verdict.incident)
    texts = section_texts(verdict)
    assert texts[0] == ":brain: *Forensics: the model's state*"
    assert "*Action*\nhalt" in texts
    assert halt.payload["text"].startswith("halted by the trainer: the loss jumped")
    assert "forensics: state-caused" in halt.payload["text"]


def test_kill_9_and_restart_keep_every_verdict_and_count(story: Story) -> None:
    svc = story.service
    before = {run: incident_of(svc, run, j.verdict.incident) for run, j in story.judged.items()}
    svc.kill()
    svc.start()
    for run, (cause, _) in RUNS.items():
        assert incident_of(svc, run, story.judged[run].verdict.incident) == before[run]
        assert svc.get(f"/v1/runs/{run}")[1]["verdicts"] == {cause: 1}
    _, metrics = svc.get("/metrics")
    assert metric(metrics, "spikewatch_verdicts_total", run="gpt-state", cause="state") == 1
    assert svc.get("/v1/runs/gpt-halt")[1]["state"] == "halted"


# -- a store written before verdicts, and the pieces on their own -------------------------


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _spike_in_trainer_mode(client: TestClient, run: str) -> None:
    """`SPIKING` and the decisions a trainer's own monitor takes on it (the wire body)."""
    monitor = Monitor(run=run)
    for start in range(0, 600, 100):
        steps = range(start, start + 100)
        observed = [monitor.observe(StepRecord(run=run, step=s, loss=SPIKING[s])) for s in steps]
        decisions = [d.to_json() for step in observed for d in step]
        records = [{"step": s, "loss": SPIKING[s]} for s in steps]
        body = {"records": records, "decisions": decisions, "client": "c", "seq": start}
        answer = client.post(f"/v1/runs/{run}/records", json=body, headers=AUTH)
        assert answer.status_code == 200, answer.text


def test_a_store_from_before_verdicts_loads_every_incident_with_verdict_none(
    tmp_path: Path,
) -> None:
    db = tmp_path / "events.db"
    service = Service(ServiceConfig(db=str(db)), token=TOKEN)
    _spike_in_trainer_mode(TestClient(create_app(service)), "old")
    service.stop()
    with sqlite3.connect(db) as raw:  # what an older spikewatch wrote: no verdict anywhere
        raw.execute("UPDATE incidents SET body = json_remove(body, '$.verdict')")
        raw.execute("UPDATE runs SET info = json_remove(info, '$.verdicts')")
        bodies = [b for (b,) in raw.execute("SELECT body FROM incidents")]
    assert bodies and not any("verdict" in b for b in bodies)

    service = Service(ServiceConfig(db=str(db)), token=TOKEN)
    try:
        client = TestClient(create_app(service))
        incidents = client.get("/v1/runs/old/incidents").json()["incidents"]
        assert incidents and [i["verdict"] for i in incidents] == [None] * len(incidents)
        assert all(i.verdict is None for i in service.registry.runs["old"].monitor.incidents)
        assert client.get("/v1/runs/old").json()["verdicts"] == {}
        metrics = client.get("/metrics").text
        assert metric(metrics, "spikewatch_verdicts_total", run="old", cause="data") == 0
    finally:
        service.stop()


def test_every_verdict_field_is_checked_and_a_judged_verdict_passes() -> None:
    assert set(CHECKS) == set(Verdict.__dataclass_fields__)
    v = Verdict(cause="data", incident="r:1", step=30, onset_step=10, suspect_loss=float("nan"),
                samples=[{"position": 11, "index": None, "loss": float("inf")}])  # fmt: skip
    assert verdict_problem(v.to_json()) is None  # non-finite losses are data


def test_a_message_without_a_thread_names_the_incident_and_escapes_what_the_trainer_wrote() -> None:
    v = Verdict(cause="state", incident="loss<1>", step=9, onset_step=5,
                why="loss & grad <fine>", action="lr x0.5 now")  # fmt: skip
    msg = verdict_message("run&1", v.incident, v, threaded=False)
    assert msg.blocks[0]["text"]["text"] == (
        ":brain: *Forensics: the model's state* (incident `loss&lt;1&gt;` in *run&amp;1*)"
    )
    assert "*Why*\nloss &amp; grad &lt;fine&gt;" in [
        b["text"]["text"] for b in msg.blocks if b.get("type") == "section" and "text" in b
    ]
    assert msg.text.endswith("(incident loss&lt;1&gt; in run&amp;1)")


def test_a_verdict_in_the_batch_of_its_rollback_still_lands_in_the_incidents_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)  # slack_sdk would send loopback through one
    monitor = Monitor(run="one")
    records, decisions = [], []
    for step, loss in enumerate(SPIKING):  # up to the rollback, as the trainer stops there
        records.append({"step": step, "loss": loss})
        decisions += monitor.observe(StepRecord(run="one", step=step, loss=loss))
        if decisions and decisions[-1].action == "rollback":
            break
    rollback = decisions[-1]
    decided, _ = monitor.adopt_verdict(rollback, probe("data", rollback, monitor.config.forensics))
    assert monitor.last_verdict is not None
    event = {
        "event": "verdict",
        "verdict": monitor.last_verdict.to_json(),
        "decision": decided.to_json(),
    }
    body = {"records": records, "decisions": [d.to_json() for d in decisions], "events": [event]}
    with running_emulator(token=SLACK_TOKEN) as emulator:
        sink = slack_sink(emulator.url + "/api/")
        service = Service(ServiceConfig(db=str(tmp_path / "events.db")), token=TOKEN, slack=sink)
        try:
            answer = TestClient(create_app(service)).post(
                "/v1/runs/one/records", json=body, headers=AUTH
            )
            assert answer.status_code == 200, answer.text
            delivered(sink, 2)
            incident, verdict = emulator.calls_to("chat.postMessage")
            assert "thread_ts" not in incident.payload
            assert verdict.payload["thread_ts"] == sink.threads[f"one/{rollback.signal.incident}"]  # type: ignore[union-attr]
            assert section_texts(verdict)[0] == ":mag: *Forensics: bad data*"
        finally:
            service.stop()


def test_a_stored_verdict_that_does_not_parse_is_posted_as_its_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    notice = verdict_notice("r", "i1", {"cause": "cosmic rays", "why": "written by hand"})
    with running_emulator(token=SLACK_TOKEN) as emulator:
        sink = slack_sink(emulator.url + "/api/")
        sink.post([notice])
        delivered(sink, 1)
        sink.close()
    [post] = emulator.calls_to("chat.postMessage")
    assert post.payload["text"] == (
        "Follow-up on incident `i1` in *r*: forensics: cosmic rays (written by hand)"
    )
    assert sink.failures == 0  # delivered, not retried forever ahead of its thread


def test_an_event_the_service_refuses_is_not_sent_again_with_every_later_batch(
    tmp_path: Path,
) -> None:
    """A 422 naming an event drops that event: put back into the next batch, it would
    get every later batch refused and all the run's records lost."""
    with ServiceProcess(tmp_path) as svc:
        client = HttpTransport(svc.url, run="gpt-bad-event", token=TOKEN, flush_interval_s=0.05)
        bad = {"event": "verdict", "verdict": {"cause": "data", "step": "x"}, "decision": {}}
        first = [StepRecord(run="gpt-bad-event", step=s, loss=2.0) for s in range(10)]
        client.report(first, [], [bad])
        wait_for(lambda: client.failures >= 1, timeout=15, what="the refusal")
        later = [StepRecord(run="gpt-bad-event", step=s, loss=2.0) for s in range(10, 60)]
        client.report(later, [])
        assert client.finish(timeout=15)
        client.close(timeout=5)
        status, view = svc.get("/v1/runs/gpt-bad-event")
        assert status == 200, view
        assert view["last_step"] == 59  # the later records were all taken
        assert client.rejected_reports == 1 and client.rejected == 10
