"""The HTTP API of `spikewatch serve`: tokens, payload errors, size limits, OpenAPI, fuzzing.

Runs the real FastAPI app in-process (`TestClient`), on a temporary SQLite store.
The command flows (rollback, acks, approval, halt) are in ``test_service_commands.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spikewatch.service.app import create_app
from spikewatch.service.config import ServiceConfig
from spikewatch.service.core import Service

TOKEN = "s3cret-7f3a9c-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RUN = "gpt-1b"
OK_BODY = {"records": [{"step": 0, "loss": 2.5}]}
NEVER_500 = {200, 400, 413, 422}

# Every endpoint that writes or commands, with a body it would accept.
WRITE_CASES: list[tuple[str, dict[str, Any]]] = [
    (f"/v1/runs/{RUN}/records", OK_BODY),
    (f"/v1/runs/{RUN}/commands", {"action": "halt"}),
    (f"/v1/runs/{RUN}/commands", {"action": "resume"}),
    (f"/v1/runs/{RUN}/commands", {"action": "approve", "command": "c1"}),
    (f"/v1/runs/{RUN}/commands", {"action": "veto", "command": "c1"}),
    (f"/v1/runs/{RUN}/commands", {"action": "rollback", "rollback_before_step": 0}),
]
WRITES = [pytest.param(path, body, id=body.get("action", "ingest")) for path, body in WRITE_CASES]


def make_client(tmp_path: Path, **config: Any) -> tuple[Service, TestClient]:
    service = Service(ServiceConfig(db=str(tmp_path / "events.db"), **config), token=TOKEN)
    return service, TestClient(create_app(service), raise_server_exceptions=False)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    service, test_client = make_client(tmp_path, max_records=10)
    yield test_client
    service.stop()


def ingest(client: TestClient, body: bytes, run: str = RUN) -> Any:
    return client.post(f"/v1/runs/{run}/records", content=body, headers=AUTH)


def records(*losses: float, start: int = 0) -> list[dict[str, Any]]:
    return [{"step": start + i, "loss": loss} for i, loss in enumerate(losses)]


# -- tokens ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "body"), WRITES)
def test_a_write_without_a_token_is_401_with_a_challenge(
    client: TestClient, path: str, body: dict[str, Any]
) -> None:
    for headers in ({}, {"Authorization": "Basic " + TOKEN}, {"Authorization": "Bearer"}):
        answer = client.post(path, json=body, headers=headers)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in answer.json()["error"]


@pytest.mark.parametrize(("path", "body"), WRITES)
def test_a_write_with_a_wrong_token_is_403(
    client: TestClient, path: str, body: dict[str, Any]
) -> None:
    for wrong in (b"nope", TOKEN.encode() + b"x", TOKEN.encode()[:-1], "tök".encode()):
        answer = client.post(path, json=body, headers={b"Authorization": b"Bearer " + wrong})
        assert answer.status_code == 403
        assert "wrong token" in answer.json()["error"]
    assert client.get(f"/v1/runs/{RUN}").status_code == 404  # nothing was ingested


def test_reads_need_no_token_and_no_answer_shows_the_token(client: TestClient) -> None:
    assert ingest(client, json.dumps({"records": records(2.5, 2.4)}).encode()).status_code == 200
    answers = [client.get(path) for path in (
        "/v1/runs", f"/v1/runs/{RUN}", f"/v1/runs/{RUN}/incidents", "/metrics", "/healthz",
        "/openapi.json",
    )]  # fmt: skip
    assert [a.status_code for a in answers] == [200] * 6
    answers += [
        client.post(path, json=body, headers=headers)
        for headers in ({}, AUTH, {"Authorization": "Bearer wrong"})
        for path, body in WRITE_CASES
    ]
    answers.append(ingest(client, b"{not json"))
    for answer in answers:
        assert TOKEN not in answer.text
        assert TOKEN not in str(answer.headers)


# -- payload errors -------------------------------------------------------------------------
def test_malformed_json_is_400_with_a_message(client: TestClient) -> None:
    for body in (b'{"records": [', b"", b"\xff\xfe\x00", b"records=1"):
        answer = ingest(client, body)
        assert answer.status_code == 400
        assert answer.json()["field"] == "body"
        assert "not valid JSON" in answer.json()["error"]


GOOD = records(2.5, 2.4, 2.3)


def one(**record: Any) -> dict[str, Any]:
    """A body with one record: step 0, loss 1.0, changed by ``record`` (None deletes)."""
    fields = {"step": 0, "loss": 1.0, **record}
    return {"records": [{k: v for k, v in fields.items() if v is not None}]}


BAD_BODIES = [
    pytest.param({"records": [*GOOD, {"step": 3, "loss": "2"}]}, "records[3].loss", id="str-loss"),
    pytest.param(one(step=True), "records[0].step", id="bool-step"),
    pytest.param(one(step=1.0), "records[0].step", id="float-step"),
    pytest.param(one(step=None), "records[0].step", id="no-step"),
    pytest.param(one(loss=None), "records[0].loss", id="no-loss"),
    pytest.param(one(loss=True), "records[0].loss", id="bool-loss"),
    pytest.param(one(loss=[1.0]), "records[0].loss", id="list-loss"),
    pytest.param({"records": "abc"}, "records", id="str-records"),
    pytest.param({"records": {"step": 0}}, "records", id="dict-records"),
    pytest.param({"records": [1.0]}, "records[0]", id="number-record"),
    pytest.param({}, "records", id="no-records"),
    pytest.param([OK_BODY], "body", id="list-body"),
    pytest.param({**OK_BODY, "extra": 1}, "extra", id="unknown-field"),
    pytest.param(one(los=1), "records[0].los", id="unknown-record-field"),
    pytest.param(one(run="other"), "records[0].run", id="other-run"),
    pytest.param({"records": [*GOOD, {"step": 2, "loss": 1.0}]}, "records[3].step", id="repeat"),
    pytest.param({"records": [*GOOD, {"step": 1, "loss": 1.0}]}, "records[3].step", id="back"),
    pytest.param({"records": records(*[1.0] * 11)}, "records", id="too-many"),
    pytest.param(one(grad_norm="1"), "records[0].grad_norm", id="str-grad-norm"),
    pytest.param(one(lr=False), "records[0].lr", id="bool-lr"),
    pytest.param(one(data_position=1.5), "records[0].data_position", id="float-position"),
    pytest.param({**OK_BODY, "seq": "1"}, "seq", id="str-seq"),
    pytest.param({**OK_BODY, "client": "x" * 129}, "client", id="long-client"),
    pytest.param({**OK_BODY, "acks": "c1"}, "acks", id="str-acks"),
    pytest.param({**OK_BODY, "acks": [1]}, "acks", id="int-ack"),
    pytest.param({**OK_BODY, "rewind_to": 1.5}, "rewind_to", id="float-rewind"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
def test_a_wrong_type_is_422_naming_the_field(client: TestClient, body: Any, field: str) -> None:
    answer = ingest(client, json.dumps(body).encode())
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
    assert answer.json()["error"].startswith(field)
    assert client.get(f"/v1/runs/{RUN}").status_code == 404  # nothing half-ingested


def test_non_finite_losses_are_data(client: TestClient) -> None:
    body = b'{"records": [{"step": 0, "loss": NaN}, {"step": 1, "loss": Infinity}, ' + (
        b'{"step": 2, "loss": -Infinity, "grad_norm": NaN}]}'
    )
    answer = ingest(client, body)
    assert (answer.status_code, answer.json()["accepted"]) == (200, 3)
    run = client.get(f"/v1/runs/{RUN}").json()
    assert (run["records"], run["loss"]) == (3, -math.inf)


def test_a_body_over_the_limit_is_413(tmp_path: Path) -> None:
    service, client = make_client(tmp_path, max_body_bytes=1024)
    body = json.dumps({"records": records(*[2.0] * 60)}).encode()
    assert len(body) > 1024
    declared = ingest(client, body)  # Content-Length says it all
    streamed = client.post(  # chunked, no Content-Length: counted while reading
        f"/v1/runs/{RUN}/records", content=iter([body[:600], body[600:]]), headers=AUTH
    )
    for answer in (declared, streamed):
        assert answer.status_code == 413
        assert "1024" in answer.json()["error"]
    assert ingest(client, json.dumps(OK_BODY).encode()).status_code == 200
    service.stop()


@pytest.mark.parametrize("run", ["a b", "-lead", ".hidden", "x" * 129, "run!", "ünï"])
def test_a_bad_run_id_is_422(client: TestClient, run: str) -> None:
    quoted = run.replace(" ", "%20")
    answers = [
        client.post(f"/v1/runs/{quoted}/records", json=OK_BODY, headers=AUTH),
        client.get(f"/v1/runs/{quoted}"),
        client.get(f"/v1/runs/{quoted}/incidents"),
    ]
    for answer in answers:
        assert answer.status_code == 422, answer.text
        assert answer.json()["field"] == "run"


def test_an_unknown_run_is_404(client: TestClient) -> None:
    assert client.get("/v1/runs/nobody").status_code == 404
    assert client.get("/v1/runs/nobody/incidents").status_code == 404
    halt = client.post("/v1/runs/nobody/commands", json={"action": "halt"}, headers=AUTH)
    assert halt.status_code == 404
    assert client.get("/v1/runs").json() == {"runs": []}


# Integers that JSON allows but a float or SQLite INTEGER cannot hold.
HUGE = "1" + "0" * 400
BIG = "9" * 30
OUT_OF_RANGE = [
    pytest.param(f'{{"records": [{{"step": 0, "loss": {HUGE}}}]}}', id="int-loss"),
    pytest.param(f'{{"records": [{{"step": 0, "loss": 1, "grad_norm": {HUGE}}}]}}', id="grad"),
    pytest.param(f'{{"records": [{{"step": 0, "loss": 1, "wall_time": {HUGE}}}]}}', id="wall"),
    pytest.param(f'{{"records": [{{"step": {BIG}, "loss": 1.0}}]}}', id="step"),
    pytest.param(f'{{"records": [], "rewind_to": {BIG}}}', id="rewind_to"),
    pytest.param(f'{{"records": [{{"step": 0, "loss": {"1" * 5000}}}]}}', id="5000-digits"),
    pytest.param("[" * 5000 + "]" * 5000, id="deep-nesting"),
]  # fmt: skip


@pytest.mark.parametrize("body", OUT_OF_RANGE)
def test_numbers_out_of_range_and_deep_nesting_are_4xx_not_500(
    client: TestClient, body: str
) -> None:
    answer = ingest(client, body.encode())
    assert answer.status_code in (400, 422), answer.text
    assert "field" in answer.json()


# -- never 500 ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    service, test_client = make_client(tmp_path_factory.mktemp("fuzz"), max_body_bytes=4096)
    yield test_client
    service.stop()


# Integers around the limits of a float and of SQLite's 64-bit INTEGER are the dangerous ones.
edge_ints = st.integers() | st.integers(2**62, 2**64) | st.integers(-(2**64), -(2**62))
json_values = st.recursive(
    st.none() | st.booleans() | edge_ints | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
numbers = st.floats() | edge_ints | st.integers(10**308, 10**310)
record_like = st.fixed_dictionaries(
    {"step": edge_ints | json_values, "loss": numbers | json_values},
    optional={
        name: numbers | json_values for name in ("grad_norm", "lr", "data_position", "wall_time")
    },
)
signal_like = st.fixed_dictionaries(
    {"run": st.text(max_size=3), "kind": st.sampled_from(["spike", "nonfinite", "x"]),
     "metric": st.sampled_from(["loss", "grad_norm"]), "step": edge_ints, "value": numbers,
     "score": numbers, "baseline": numbers, "onset_step": edge_ints | json_values,
     "peak_step": edge_ints},
    optional={"incident": st.text(max_size=4) | json_values, "end_step": json_values},
)  # fmt: skip
decision_like = st.fixed_dictionaries(
    {"run": st.text(max_size=3) | json_values, "step": edge_ints | json_values,
     "action": st.sampled_from(["watch", "skip_step", "rollback", "halt", "boom"]),
     "reason": st.text(max_size=5) | json_values},
    optional={"signal": signal_like | json_values, "rollback_before_step": edge_ints | json_values,
              "lr_factor": numbers | json_values, "skip_ahead": edge_ints | json_values},
)  # fmt: skip
event_like = st.fixed_dictionaries(
    {"event": st.sampled_from(["proposed", "folded", "refused", "expired", "other"])},
    optional={"proposal": json_values, "decision": decision_like | json_values,
              "outcome": json_values, "reason": json_values},
)  # fmt: skip
ingest_like = st.fixed_dictionaries(
    {"records": st.lists(record_like, max_size=6)},
    optional={
        "seq": edge_ints | json_values, "client": st.text(max_size=4) | json_values,
        "acks": st.lists(st.text(max_size=4)) | json_values, "rewind_to": edge_ints | json_values,
        "dropped": edge_ints | json_values,
        # A deciding trainer's report: decisions, events, settings, restorable steps.
        "decisions": st.lists(decision_like | json_values, max_size=3) | json_values,
        "events": st.lists(event_like | json_values, max_size=3) | json_values,
        "config": json_values, "restorable": st.lists(edge_ints, max_size=3) | json_values,
    },
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_values | ingest_like)
def test_random_json_never_gives_a_500(fuzz_client: TestClient, body: Any) -> None:
    answer = ingest(fuzz_client, json.dumps(body).encode())
    assert answer.status_code in NEVER_500, (body, answer.text)


@settings(max_examples=80, deadline=None)
@given(body=st.binary(max_size=300))
def test_random_bytes_never_give_a_500(fuzz_client: TestClient, body: bytes) -> None:
    answer = ingest(fuzz_client, body, run="bytes")
    assert answer.status_code in NEVER_500, (body, answer.text)


# -- OpenAPI --------------------------------------------------------------------------------
def test_openapi_lists_every_route_and_the_ingest_schema(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["paths"].keys() == {
        "/v1/runs/{run}/records", "/v1/runs", "/v1/runs/{run}", "/v1/runs/{run}/incidents",
        "/v1/runs/{run}/commands", "/v1/runs/{run}/config", "/metrics", "/healthz",
    }  # fmt: skip
    post = spec["paths"]["/v1/runs/{run}/records"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["records"]
    assert schema["properties"].keys() == {
        "records", "seq", "client", "acks", "rewind_to", "dropped", "finished",
        "decisions", "events", "config", "restorable",
    }  # fmt: skip
    item = schema["properties"]["records"]["items"]
    assert (item["required"], item["additionalProperties"]) == (["step", "loss"], False)
    assert item["properties"]["step"] == {"type": "integer"}
    assert "commands" in spec["components"]["schemas"]["IngestOut"]["properties"]
    command = spec["paths"]["/v1/runs/{run}/commands"]["post"]["requestBody"]
    ref = command["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    actions = spec["components"]["schemas"][ref]["properties"]["action"]["enum"]
    assert set(actions) == {"halt", "resume", "approve", "veto", "rollback"}
