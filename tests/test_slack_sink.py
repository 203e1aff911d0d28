"""The Slack sink against a local Slack emulator, with the real slack_sdk clients."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from slack_sdk import WebClient
from slack_sdk.webhook import WebhookClient

from slack_emulator import SlackEmulator, channel_id, running_emulator
from spikewatch.errors import ConfigError
from spikewatch.incidents import Incident
from spikewatch.service.status import RunStatus
from spikewatch.sinks.chart import render_incident_chart
from spikewatch.sinks.slack import SlackSettings, SlackSink
from spikewatch.sinks.slack_messages import loss_after, loss_before

TOKEN = "xoxb-emulator-token"
PNG = b"\x89PNG\r\n\x1a\n"
SinkFactory = Callable[..., SlackSink]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.01)


def make_incident(incident_id: str = "inc-1", run: str = "run-7") -> Incident:
    return Incident(
        id=incident_id, run=run, kind="spike", metric="loss", onset_step=100, peak_step=102,
        end_step=105, transient=True, score=14.2, action="rollback", detected_step=101,
        reason="loss 9.8 is 14.2 robust sigmas above 2.3", status="closed",
    )  # fmt: skip


# Before the onset: 2.2/2.4 alternating (median 2.3); the spike peaks at 12 on step 102;
# after the end (step 105): 2.4 and 2.5 alternating with one NaN (median of finite: 2.45).
WINDOW = (
    [(s, 2.2 if s % 2 else 2.4) for s in range(80, 100)]
    + [(100, 5.0), (101, 9.8), (102, 12.0), (103, 8.0), (104, 4.0), (105, 3.0)]
    + [(s, 2.4 if s % 2 else 2.5) for s in range(106, 118)]
    + [(118, float("nan"))]
)


def run_status(run: str, state: Any = "active", **extra: Any) -> RunStatus:
    return RunStatus(
        run=run, state=state, records=500, last_step=499, last_record_time=0.0, loss=2.31,
        grad_norm=1.0, lr=1e-3, spike_score=0.4, **extra,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # slack_sdk sends every request through $HTTPS_PROXY when set, loopback included.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def emulator() -> Iterator[SlackEmulator]:
    with running_emulator(token=TOKEN) as emu:
        yield emu


@pytest.fixture
def make_sink(emulator: SlackEmulator) -> Iterator[SinkFactory]:
    """Build sinks on the emulator with fast retries; close them after the test."""
    sinks: list[SlackSink] = []

    def make(*, webhook: bool = False, timeout: int = 2, **kwargs: Any) -> SlackSink:
        kwargs.setdefault("max_retries", 2)
        kwargs.setdefault("backoff_s", 0.01)
        kwargs.setdefault("max_retry_after_s", 5.0)
        if webhook:
            hook = WebhookClient(emulator.url + "/services/T000/B000/XXXX", timeout=timeout)
            sink = SlackSink(webhook=hook, **kwargs)
        else:
            client = WebClient(token=TOKEN, base_url=emulator.url + "/api/", timeout=timeout)
            sink = SlackSink(client=client, channel="#alerts", **kwargs)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close(timeout=0.5)


def fields_text(payload: dict[str, Any]) -> list[str]:
    blocks = payload["blocks"]
    section = next(b for b in blocks if b["type"] == "section" and "fields" in b)
    return [f["text"] for f in section["fields"]]


def test_incident_message_has_every_field_and_its_chart_in_the_thread(
    emulator: SlackEmulator, make_sink: SinkFactory
) -> None:
    seen: list[tuple[str, str]] = []
    sink = make_sink(on_thread=lambda key, ts: seen.append((key, ts)))
    sink.incident(make_incident(), WINDOW, decision_reason="rollback: 14.2 sigma, budget 2/3")
    wait_for(lambda: sink.delivered == 1)

    (post,) = emulator.calls_to("chat.postMessage")
    payload = post.payload
    assert payload["channel"] == "#alerts"
    assert payload["blocks"][0]["type"] == "header"
    assert payload["blocks"][0]["text"]["text"] == ":rotating_light: Spike in run-7"
    assert fields_text(payload) == [
        "*Run*\nrun-7",
        "*Detected at step*\n101",
        "*Onset step*\n100",
        "*Metric*\nloss",
        "*Before (median)*\n2.3",
        "*Peak*\n12 at step 102",
        "*After*\n2.45",
        "*Decision*\n`rollback`",
    ]
    assert payload["blocks"][2]["text"]["text"] == "*Reason*\nrollback: 14.2 sigma, budget 2/3"
    assert payload["text"].startswith("Spike in run-7 at step 101 (onset 100)")

    ts = "1700000000.000001"
    (upload,) = emulator.calls_to("upload")
    assert upload.body.startswith(PNG)
    (url_call,) = emulator.calls_to("files.getUploadURLExternal")
    assert url_call.payload["filename"] == "run-7-inc-1.png"
    assert int(url_call.payload["length"]) == len(upload.body)
    (complete,) = emulator.calls_to("files.completeUploadExternal")
    assert complete.payload["channel_id"] == channel_id("#alerts")
    assert complete.payload["thread_ts"] == ts
    assert sink.threads == {"run-7/inc-1": ts}
    assert seen == [("run-7/inc-1", ts)]
    assert (sink.failures, sink.dropped) == (0, 0)


def test_one_message_per_incident_id(emulator: SlackEmulator, make_sink: SinkFactory) -> None:
    sink = make_sink()
    incident = make_incident()
    sink.incident(incident, WINDOW)
    incident.action = "halt"  # a later fold of the same episode
    sink.incident(incident, WINDOW)
    sink.incident(make_incident("inc-2"), WINDOW)
    sink.incident(make_incident("inc-1", run="run-8"), WINDOW)  # same id, another run
    wait_for(lambda: sink.delivered == 3)
    posts = emulator.calls_to("chat.postMessage")
    assert [p.payload["blocks"][0]["text"]["text"] for p in posts] == [
        ":rotating_light: Spike in run-7",
        ":rotating_light: Spike in run-7",
        ":rotating_light: Spike in run-8",
    ]
    assert fields_text(posts[0].payload)[-1] == "*Decision*\n`rollback`"  # copied when queued
    assert len(emulator.calls_to("upload")) == 3


def test_follow_up_lands_in_the_incident_thread(
    emulator: SlackEmulator, make_sink: SinkFactory
) -> None:
    sink = make_sink()
    sink.incident(make_incident(), WINDOW)
    sink.follow_up("run-7", "inc-1", "rolled back to step 64; skipped 40 batches")
    sink.follow_up("run-7", "never-posted", "recovered")
    wait_for(lambda: sink.delivered == 3)
    first, reply, standalone = emulator.calls_to("chat.postMessage")
    assert "thread_ts" not in first.payload
    assert reply.payload["thread_ts"] == sink.threads["run-7/inc-1"]
    assert reply.payload["text"] == "rolled back to step 64; skipped 40 batches"
    assert "thread_ts" not in standalone.payload
    assert (
        standalone.payload["text"] == "Follow-up on incident `never-posted` in *run-7*: recovered"
    )


def test_digest_is_one_message_with_every_run(
    emulator: SlackEmulator, make_sink: SinkFactory
) -> None:
    sink = make_sink()
    runs = [
        run_status("run-a", incidents_total=2, incidents_open=1, rollbacks=1),
        run_status("run-b", state="halted", incidents_total=1, rollbacks=3),
    ]
    sink.digest(runs, period_s=86400)
    wait_for(lambda: sink.delivered == 1)
    (post,) = emulator.calls_to("chat.postMessage")
    texts = [b["text"]["text"] for b in post.payload["blocks"]]
    assert texts[0] == "spikewatch digest — last 24 h"
    assert texts[1] == "2 runs (1 halted, 0 stalled), 3 incidents, 4 rollbacks"
    assert texts[2] == (
        ":red_circle: *run-b* — halted\nstep 499 · loss 2.31 · incidents 1 (0 open) · rollbacks 3"
    )
    assert texts[3].startswith(":large_green_circle: *run-a* — active\n")
    assert "incidents 2 (1 open) · rollbacks 1" in texts[3]


def test_rate_limit_waits_for_retry_after_then_delivers(
    emulator: SlackEmulator, make_sink: SinkFactory
) -> None:
    sink = make_sink()
    emulator.fail_next(1, status=429, retry_after=1)
    start = time.monotonic()
    sink.digest([run_status("run-a")], period_s=3600)
    wait_for(lambda: sink.delivered == 1)
    assert time.monotonic() - start >= 1.0
    assert [c.status for c in emulator.calls_to("chat.postMessage", status=None)] == [429, 200]
    assert sink.failures == 0


def test_retry_after_past_the_limit_is_a_failure_not_a_sleep(
    emulator: SlackEmulator, make_sink: SinkFactory
) -> None:
    sink = make_sink(max_retry_after_s=5.0)
    emulator.fail_next(1, status=429, retry_after=3600)
    start = time.monotonic()
    sink.digest([run_status("run-a")], period_s=3600)
    wait_for(lambda: sink.failures == 1)
    assert time.monotonic() - start < 2.0
    assert sink.delivered == 0


def test_server_errors_past_max_retries_count_one_failure_and_the_worker_lives_on(
    emulator: SlackEmulator, make_sink: SinkFactory
) -> None:
    sink = make_sink(max_retries=2)
    emulator.fail_next(3, status=500)  # the first try and both retries
    sink.incident(make_incident(), WINDOW)
    wait_for(lambda: sink.failures == 1)
    assert [c.status for c in emulator.calls_to("chat.postMessage", status=None)] == [500] * 3
    assert (sink.threads, sink.pending) == ({}, 1)  # it waits in the outbox
    sink.incident(make_incident(), WINDOW)  # already queued: not a second message
    wait_for(lambda: sink.delivered == 1)  # the outbox tried it again (1 s later)
    statuses = [c.status for c in emulator.calls_to("chat.postMessage", status=None)]
    assert (statuses, sink.failures, sink.pending) == ([500, 500, 500, 200], 1, 0)


def test_a_failed_chart_upload_still_delivers_the_message(
    emulator: SlackEmulator, make_sink: SinkFactory
) -> None:
    sink = make_sink(max_retries=0)
    emulator.fail_next(1, status=500, method="files.completeUploadExternal")
    sink.incident(make_incident(), WINDOW)
    wait_for(lambda: sink.delivered == 1)
    assert sink.failures == 1
    assert len(emulator.calls_to("chat.postMessage")) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


def test_slack_down_counts_failures_and_never_blocks_the_caller() -> None:
    client = WebClient(token=TOKEN, base_url=f"http://127.0.0.1:{free_port()}/api/", timeout=1)
    sink = SlackSink(client=client, channel="#alerts", max_retries=2, backoff_s=0.01)
    try:
        start = time.monotonic()
        sink.incident(make_incident(), WINDOW)
        sink.follow_up("run-7", "inc-1", "rolled back")
        sink.digest([run_status("run-a")], period_s=60)
        assert time.monotonic() - start < 0.2
        wait_for(lambda: sink.failures == 3)
        assert (sink.delivered, sink.dropped) == (0, 0)
    finally:
        sink.close(timeout=1.0)


def test_a_hanging_server_times_out_and_close_does_not_wait_forever(
    emulator: SlackEmulator, make_sink: SinkFactory
) -> None:
    sink = make_sink(timeout=1, max_retries=0)
    emulator.hang(10.0)
    start = time.monotonic()
    sink.digest([run_status("run-a")], period_s=60)
    assert time.monotonic() - start < 0.2
    wait_for(lambda: sink.failures == 1, timeout=5.0)  # the client's 1 s read timeout
    sink.digest([run_status("run-a")], period_s=60)
    start = time.monotonic()
    sink.close(timeout=0.2)
    assert time.monotonic() - start < 1.0


def test_full_queue_drops_and_counts(emulator: SlackEmulator, make_sink: SinkFactory) -> None:
    sink = make_sink(max_queue=3, timeout=5)
    emulator.hang(10.0)
    sink.digest([run_status("run-a")], period_s=60)
    wait_for(lambda: len(emulator.calls) == 1)  # the worker is now stuck in that request
    for _ in range(4):
        sink.digest([run_status("run-a")], period_s=60)
    # The message in flight is still in the outbox until Slack answers: 1 + 2 fit.
    assert (sink.dropped, sink.pending) == (2, 3)
    emulator.hang(None)
    wait_for(lambda: sink.delivered == 3)
    assert sink.failures == 0


def test_webhook_mode_posts_without_threads_or_charts(
    emulator: SlackEmulator, make_sink: SinkFactory
) -> None:
    sink = make_sink(webhook=True)
    sink.incident(make_incident(), WINDOW)
    sink.follow_up("run-7", "inc-1", "recovered")
    wait_for(lambda: sink.delivered == 2)
    incident, follow_up = emulator.calls_to("webhook")
    assert fields_text(incident.payload)[0] == "*Run*\nrun-7"
    assert "chart not attached" in incident.payload["text"]
    assert follow_up.payload["text"] == "Follow-up on incident `inc-1` in *run-7*: recovered"
    assert emulator.calls_to("upload", status=None) == []
    assert sink.threads == {}


def test_webhook_rate_limits_retry_then_give_up_past_the_limit(
    emulator: SlackEmulator, make_sink: SinkFactory
) -> None:
    sink = make_sink(webhook=True)
    emulator.fail_next(1, status=429, retry_after=1)
    sink.digest([run_status("run-a")], period_s=60)
    wait_for(lambda: sink.delivered == 1)
    emulator.fail_next(1, status=429, retry_after=3600)  # the client returns, not raises, 429
    sink.digest([run_status("run-a")], period_s=60)
    wait_for(lambda: sink.failures == 1)
    assert [c.status for c in emulator.calls_to("webhook", status=None)] == [429, 200, 429]


def test_wrong_token_is_a_failure(emulator: SlackEmulator) -> None:
    client = WebClient(token="xoxb-wrong", base_url=emulator.url + "/api/", timeout=2)
    sink = SlackSink(client=client, channel="#alerts")
    sink.digest([], period_s=60)
    wait_for(lambda: sink.failures == 1)
    sink.close(timeout=1.0)
    assert sink.delivered == 0


def test_threads_restored_after_a_restart(emulator: SlackEmulator, make_sink: SinkFactory) -> None:
    sink = make_sink(threads={"run-7/inc-1": "1699999999.000042"})
    sink.incident(make_incident(), WINDOW)  # posted by the previous process
    sink.follow_up("run-7", "inc-1", "recovered")
    wait_for(lambda: sink.delivered == 1)
    (reply,) = emulator.calls_to("chat.postMessage")
    assert reply.payload["thread_ts"] == "1699999999.000042"


def test_retry_handlers_are_bounded_by_the_settings(emulator: SlackEmulator) -> None:
    client = WebClient(token=TOKEN, base_url=emulator.url + "/api/")
    sink = SlackSink(client=client, channel="#alerts", max_retries=4)
    names = [(type(h).__name__, h.max_retry_count) for h in client.retry_handlers]
    assert names == [
        ("BoundedRateLimitRetryHandler", 4),
        ("ServerErrorRetryHandler", 4),
        ("ConnectionErrorRetryHandler", 4),
    ]
    sink.close()


def test_settings_build_a_working_sink_from_the_environment(emulator: SlackEmulator) -> None:
    environ = {"SPIKEWATCH_SLACK": TOKEN}
    data = {"channel": "#alerts", "bot_token_env": "SPIKEWATCH_SLACK", "timeout_s": 2}
    settings = SlackSettings.from_mapping(
        {**data, "base_url": emulator.url + "/api/"}, environ=environ
    )
    assert settings.enabled
    assert TOKEN not in repr(settings)
    sink = SlackSink.from_settings(settings, environ)
    assert sink is not None
    sink.digest([run_status("run-a")], period_s=60)
    wait_for(lambda: sink.delivered == 1)
    sink.close()
    assert emulator.calls_to("chat.postMessage")[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_no_slack_section_and_no_secrets_disable_the_sink() -> None:
    settings = SlackSettings.from_mapping({}, environ={})
    assert not settings.enabled
    assert SlackSink.from_settings(settings, {}) is None


def test_a_slack_section_without_secrets_is_an_error_at_start() -> None:
    with pytest.raises(ConfigError, match=r"neither \$SLACK_BOT_TOKEN nor \$SLACK_WEBHOOK_URL"):
        SlackSettings.from_mapping({"channel": "#alerts"}, environ={})


def test_settings_with_only_a_webhook_build_a_webhook_sink() -> None:
    environ = {"SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/X"}
    sink = SlackSink.from_settings(SlackSettings.from_mapping({}, environ=environ), environ)
    assert sink is not None
    assert (sink.client, type(sink.webhook)) == (None, WebhookClient)
    sink.close()


@pytest.mark.parametrize(
    ("data", "environ", "message"),
    [
        ({"chanel": "#a"}, {}, "unknown setting 'chanel' in [slack]: known settings are "),
        ({}, {"SLACK_BOT_TOKEN": "xoxb-1"}, "slack.channel=None is invalid: $SLACK_BOT_TOKEN"),
        ({"bot_token": "xoxb-1"}, {}, "slack.bot_token must not be in the config file"),
        ({"timeout_s": 0}, {}, "slack.timeout_s=0 is invalid: use an integer >= 1"),
        ({"max_queue": "big"}, {}, "slack.max_queue='big' is invalid: use an integer >= 1"),
        ({"bot_token_env": "my token"}, {}, "slack.bot_token_env='my token' is invalid"),
        ({}, {"SLACK_WEBHOOK_URL": "oops"}, "$SLACK_WEBHOOK_URL is not a URL (value hidden)"),
    ],
)
def test_settings_errors_name_the_field_the_value_and_the_fix(
    data: dict[str, Any], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        SlackSettings.from_mapping(data, environ=environ)
    assert str(caught.value).startswith(message)
    assert "oops" not in str(caught.value)  # a webhook URL is a secret too


def test_unknown_key_error_lists_the_known_keys() -> None:
    known = "channel, max_backoff_s, max_queue, max_retries, max_retry_after_s"
    with pytest.raises(ConfigError, match=known):
        SlackSettings.from_mapping({"chanel": "#a"}, environ={})


def test_sink_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="needs client="):
        SlackSink()
    client = WebClient(token=TOKEN)
    with pytest.raises(ConfigError, match="channel=None is invalid"):
        SlackSink(client=client)


@pytest.mark.parametrize(
    ("last", "end_step", "expected"),
    [(float("nan"), 105, 2.45), (2.6, 105, 2.5), (2.6, None, 2.6), (2.6, 200, 2.6)],
)
def test_loss_after_is_the_median_after_the_end_else_the_latest(
    last: float, end_step: int | None, expected: float
) -> None:
    window = [*WINDOW[:-1], (118, last)]
    assert loss_after(window, end_step) == pytest.approx(expected)
    assert loss_before(window, 100) == pytest.approx(2.3)


def test_chart_draws_non_finite_values_as_gaps() -> None:
    window = [(0, 2.0), (1, float("inf")), (2, float("nan")), (3, 1e4), (4, 2.1)]
    png = render_incident_chart(window, onset_step=1, detected_step=3, title="run: spike")
    assert png.startswith(PNG)
    assert render_incident_chart([], onset_step=0, detected_step=0, title="empty").startswith(PNG)
