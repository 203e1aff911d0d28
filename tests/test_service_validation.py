"""Service edges (issue 14, item 8): run ids, command bounds, the token, numbers, signals.

Retries without ``seq`` and steps going back are in ``test_service_attempts.py``; the
event loop under a big batch in ``test_service_limits.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service_client import metric
from spikewatch.errors import ConfigError
from spikewatch.service.command import MIN_TOKEN_CHARS, read_token
from test_service_api import AUTH, make_client

RUN = "gpt-1b"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    service, test_client = make_client(tmp_path)
    yield test_client
    service.stop()


def post(client: TestClient, path: str, body: bytes | dict[str, Any]) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers={**AUTH, "Content-Type": "application/json"})


def test_a_run_id_with_a_trailing_newline_is_refused_everywhere(client: TestClient) -> None:
    body = {"records": [{"step": 0, "loss": 1.0}], "seq": 0}
    answers = [
        post(client, "/v1/runs/nl%0A/records", body),
        client.get("/v1/runs/nl%0A"),
        post(client, "/v1/runs/nl%0A/commands", {"action": "halt"}),
    ]
    assert [a.status_code for a in answers] == [422, 422, 422]
    assert all(a.json()["field"] == "run" for a in answers)
    assert client.get("/v1/runs").json()["runs"] == []


@pytest.mark.parametrize(
    ("command", "field"),
    [
        ({"action": "rollback", "rollback_before_step": 0, "skip_ahead": 10**15}, "skip_ahead"),
        ({"action": "rollback", "rollback_before_step": -5}, "rollback_before_step"),
        ({"action": "halt", "reason": "x" * 501}, "reason"),
        ({"action": "approve", "command": "c" * 65}, "command"),
    ],
)
def test_command_fields_are_bounded(
    client: TestClient, command: dict[str, Any], field: str
) -> None:
    assert post(client, f"/v1/runs/{RUN}/records", {"records": [{"step": 0, "loss": 1.0}]})
    answer = post(client, f"/v1/runs/{RUN}/commands", command)
    assert answer.status_code == 422
    assert answer.json()["field"] == field
    assert client.get(f"/v1/runs/{RUN}").json()["commands"] == []


@pytest.mark.parametrize("token", ["x", "short-token"])
def test_a_short_service_token_is_refused_at_start(token: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"at least {MIN_TOKEN_CHARS}"):
        read_token(None, {"SPIKEWATCH_TOKEN": token})
    path = tmp_path / "token"
    path.write_text(token + "\n")
    with pytest.raises(ConfigError, match="openssl rand"):
        read_token(str(path), {})
    assert read_token(None, {"SPIKEWATCH_TOKEN": "k" * MIN_TOKEN_CHARS}) == "k" * MIN_TOKEN_CHARS


@pytest.mark.parametrize("literal", [b"1e309", b"-1e309", b"2e400"])
def test_a_number_beyond_the_float_range_gets_one_answer_with_or_without_nan(
    client: TestClient, literal: bytes
) -> None:
    plain = b'{"records": [{"step": 0, "loss": ' + literal + b"}]}"
    with_nan = b'{"records": [{"step": 0, "loss": ' + literal + b', "grad_norm": NaN}]}'
    answers = [post(client, f"/v1/runs/{RUN}/records", body) for body in (plain, with_nan)]
    assert [a.status_code for a in answers] == [400, 400]
    assert answers[0].json() == answers[1].json()
    assert "beyond the float range" in answers[0].json()["error"]
    assert client.get(f"/v1/runs/{RUN}").status_code == 404


def test_one_nan_record_is_one_nonfinite_signal(client: TestClient) -> None:
    healthy = [{"step": s, "loss": 2.0 - 0.001 * s, "grad_norm": 1.0} for s in range(100)]
    records = [*healthy, {"step": 100, "loss": math.nan, "grad_norm": math.nan}]
    body = json.dumps({"records": records, "seq": 0}).encode()  # NaN as a JSON literal
    assert post(client, f"/v1/runs/{RUN}/records", body).status_code == 200
    view = client.get(f"/v1/runs/{RUN}").json()
    assert view["signals"] == {"nonfinite": 1}
    assert view["skipped_steps"] == 1
    exported = metric(client.get("/metrics").text, "spikewatch_signals_total", run=RUN,
                      kind="nonfinite")  # fmt: skip
    assert exported == 1.0
    assert math.isnan(view["loss"])


def test_an_event_that_is_not_a_string_is_422_not_500(client: TestClient) -> None:
    """Found by the schema fuzz test: ``{"event": {}}`` raised TypeError (unhashable)."""
    body: dict[str, Any] = {"records": [], "decisions": [], "events": [{"event": {}}]}
    answer = post(client, f"/v1/runs/{RUN}/records", body)
    assert answer.status_code == 422
    assert answer.json()["field"] == "events[0]"
