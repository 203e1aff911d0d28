"""deploy/alertmanager: amtool's checks, the routes, and real deliveries to Slack.

A real Alertmanager (Debian's) runs the deploy config, rendered with the local Slack
emulator's webhook URL and shorter group waits. One test drives the whole chain — a
spiking run sent to a real ``spikewatch serve``, a real Prometheus with the deploy rules,
Alertmanager, Slack — the other posts alerts to Alertmanager's API to check routing by
severity and the inhibition of a halted run's other alerts.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pytest
import yaml

from deploy_stack import BATCH, DeployedPrometheus, TrainerClient
from prometheus_server import BIN_DIR, free_port, http_get, require_binary, stop_process
from service_client import HEALTHY, ONSET, SLACK_TOKEN, SPIKING
from service_process import ServiceProcess
from slack_emulator import Call, SlackEmulator, running_emulator

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "alertmanager"
CONFIG = DEPLOY / "alertmanager.yml"
TEMPLATE = DEPLOY / "spikewatch.tmpl"
RULES = DEPLOY.parent / "prometheus" / "alerts.yml"
ALERTMANAGER = BIN_DIR / "prometheus-alertmanager"
AMTOOL = BIN_DIR / "amtool"
WEBHOOK_PATH = "/services/T000/B000/spikewatch"
RUN = "llm:gpt-spike"


def amtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    binary = require_binary(AMTOOL)
    return subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def fast_routes(route: dict[str, Any]) -> None:
    """Group waits of a second, so a test sees the first notification at once."""
    for key in ("group_wait", "group_interval"):
        if key in route:
            route[key] = "1s"
    for child in route.get("routes", []):
        fast_routes(child)


def render_config(tmp_path: Path, webhook_url: str) -> Path:
    """The deploy config with the test's webhook URL, template path and short waits."""
    config = yaml.safe_load(CONFIG.read_text())
    del config["global"]["slack_api_url_file"]
    config["global"]["slack_api_url"] = webhook_url
    config["templates"] = [str(TEMPLATE)]
    config["route"]["group_wait"] = config["route"]["group_interval"] = "1s"
    fast_routes(config["route"])
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- amtool ---------------------------------------------------------------------------------
def test_amtool_accepts_the_config() -> None:
    done = amtool("check-config", CONFIG)
    assert done.returncode == 0, done.stdout + done.stderr


def test_amtool_accepts_the_config_with_its_templates_loaded(tmp_path: Path) -> None:
    done = amtool("check-config", render_config(tmp_path, "http://127.0.0.1:9/services/x"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 templates" in done.stdout


def spikewatch_alerts() -> list[tuple[str, str]]:
    """(alertname, severity) of every alert in deploy/prometheus/alerts.yml."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    return [(rule["alert"], rule["labels"]["severity"]) for rule in rules]


@pytest.mark.parametrize(("name", "severity"), spikewatch_alerts())
def test_every_spikewatch_alert_routes_to_slack_by_severity(name: str, severity: str) -> None:
    receiver = "slack-spikewatch-oncall" if severity == "critical" else "slack-spikewatch"
    done = amtool(
        "config", "routes", "test", f"--config.file={CONFIG}", f"--verify.receivers={receiver}",
        "service=spikewatch", f"severity={severity}", f"alertname={name}", f"run={RUN}",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == receiver


def test_other_alerts_do_not_reach_the_spikewatch_channels() -> None:
    done = amtool(
        "config", "routes", "test", f"--config.file={CONFIG}", "--verify.receivers=null",
        "alertname=NodeDown", "severity=critical",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


# -- a real Alertmanager --------------------------------------------------------------------
class Alertmanager:
    """Debian's Alertmanager on a free loopback port, every file under ``tmp_path``."""

    def __init__(self, config: Path, tmp_path: Path) -> None:
        self.config, self.tmp_path = config, tmp_path
        self.port = free_port()
        self.log_path = tmp_path / "alertmanager.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Alertmanager:
        binary = require_binary(ALERTMANAGER)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                str(binary),
                f"--config.file={self.config}",
                f"--storage.path={self.tmp_path / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",  # no gossip: one instance, loopback only
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"alertmanager did not start:\n{self.log_tail()}")
            try:
                http_get(f"{self.url}/-/ready", timeout=1.0)
                return self
            except OSError:
                time.sleep(0.1)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stop_process(self._proc, self._log)
        self._proc = self._log = None

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """POST /api/v2/alerts, as Prometheus does."""
        request = urllib.request.Request(
            f"{self.url}/api/v2/alerts",
            data=json.dumps(alerts).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=5) as response:
            assert response.status == 200

    def alerts(self) -> list[dict[str, Any]]:
        """GET /api/v2/alerts: every alert with its state (active, suppressed)."""
        alerts: list[dict[str, Any]] = json.loads(http_get(f"{self.url}/api/v2/alerts"))
        return alerts

    def notifications(self) -> dict[str, float]:
        """Alertmanager's own counters of Slack notifications: total and failed."""
        text = http_get(f"{self.url}/metrics").decode()
        counts = {}
        for line in text.splitlines():
            for name in ("notifications_total", "notifications_failed_total"):
                if line.startswith(f'alertmanager_{name}{{integration="slack"}}'):
                    counts[name] = float(line.split()[-1])
        return counts


@pytest.fixture
def emulator() -> Iterator[SlackEmulator]:
    with running_emulator(token=SLACK_TOKEN) as emu:
        yield emu


def webhook_posts(emulator: SlackEmulator, timeout: float, count: int = 1) -> list[Call]:
    """Wait for ``count`` webhook posts; the posts so far when the deadline passes."""
    deadline = time.monotonic() + timeout
    while len(emulator.calls_to("webhook", status=None)) < count:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return emulator.calls_to("webhook", status=None)


def attachment(call: Call) -> dict[str, Any]:
    (first,) = call.payload["attachments"]
    return dict(first)


def test_a_spike_in_a_real_run_reaches_slack_through_alertmanager(
    tmp_path: Path, emulator: SlackEmulator
) -> None:
    config = render_config(tmp_path, emulator.url + WEBHOOK_PATH)
    with (
        ServiceProcess(tmp_path) as service,
        Alertmanager(config, tmp_path) as alertmanager,
    ):
        target = service.url.removeprefix("http://")
        prometheus = DeployedPrometheus(
            [target], tmp_path, alertmanager=f"127.0.0.1:{alertmanager.port}"
        )
        with prometheus:
            trainer = TrainerClient(service, RUN)
            for start in range(0, ONSET, BATCH):
                trainer.send(HEALTHY, start, start + BATCH)
            # The healthy counters must be scraped before the spike for increase() to see it.
            prometheus.wait_for(f'spikewatch_records_total{{run="{RUN}"}} >= {ONSET}')
            trainer.send(SPIKING, ONSET, ONSET + BATCH)
            posts = webhook_posts(emulator, timeout=20)
        delivered = alertmanager.notifications()
        log = alertmanager.log_tail()
    assert posts, f"no Slack message within 20 s; Alertmanager says:\n{log}"
    assert delivered["notifications_total"] >= 1
    assert delivered["notifications_failed_total"] == 0, f"Slack refused it:\n{log}"
    post = posts[0]
    assert post.payload["channel"] == "#spikewatch"
    message = attachment(post)
    # One alert per signal kind the jump raised (a spike, and a level shift as it stays up).
    summaries = [line for line in message["text"].splitlines() if line.startswith("*INFO*: ")]
    assert f"*INFO*: Loss spike detected in run {RUN}" in summaries
    assert message["title"] == f"[FIRING:{len(summaries)}] SpikewatchSpikeDetected in run {RUN}"
    assert f"GET /v1/runs/{RUN}/incidents" in message["text"]
    assert message["color"] == "warning"


def alert(name: str, severity: str, run: str = RUN) -> dict[str, Any]:
    labels = {"alertname": name, "service": "spikewatch", "severity": severity}
    labels |= {"job": "spikewatch", "instance": "sw:9650", "run": run, "project": "llm"}
    return {
        "labels": labels,
        "annotations": {"summary": f"{name} summary", "description": f"{name} description"},
    }


def test_critical_alerts_go_to_on_call_and_a_halt_inhibits_the_rest(
    tmp_path: Path, emulator: SlackEmulator
) -> None:
    config = render_config(tmp_path, emulator.url + WEBHOOK_PATH)
    with Alertmanager(config, tmp_path) as alertmanager:
        # The halt first: inhibition applies to what arrives while the halt fires.
        alertmanager.post_alerts([alert("SpikewatchRunHalted", "critical")])
        alertmanager.post_alerts(
            [
                alert("SpikewatchRollback", "warning"),
                alert("SpikewatchSpikeDetected", "info"),
                alert("SpikewatchRollback", "warning", run="llm:other-run"),
            ]
        )
        posts = webhook_posts(emulator, timeout=15, count=2)
        states = {
            (a["labels"]["alertname"], a["labels"]["run"]): a["status"]["state"]
            for a in alertmanager.alerts()
        }
        delivered = alertmanager.notifications()
        log = alertmanager.log_tail()
    titles = sorted((p.payload["channel"], attachment(p)["title"]) for p in posts)
    assert titles == [
        ("#spikewatch", "[FIRING:1] SpikewatchRollback in run llm:other-run"),
        ("#spikewatch-oncall", f"[FIRING:1] SpikewatchRunHalted in run {RUN}"),
    ]
    oncall = next(p for p in posts if p.payload["channel"] == "#spikewatch-oncall")
    assert attachment(oncall)["text"] == (
        "<!channel> *CRITICAL*: SpikewatchRunHalted summary\nSpikewatchRunHalted description\n"
    )
    assert attachment(oncall)["color"] == "danger"
    assert delivered == {"notifications_total": 2.0, "notifications_failed_total": 0.0}, log
    assert states == {
        ("SpikewatchRunHalted", RUN): "active",
        ("SpikewatchRollback", RUN): "suppressed",
        ("SpikewatchSpikeDetected", RUN): "suppressed",
        ("SpikewatchRollback", "llm:other-run"): "active",
    }
