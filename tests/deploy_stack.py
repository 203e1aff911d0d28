"""The deployed stack for the deploy/ tests: Prometheus on deploy/'s config, a trainer client."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from prometheus_server import PrometheusServer
from service_client import HEALTHY, ONSET, SLACK_TOKEN, SPIKING
from service_process import ServiceProcess
from slack_emulator import SlackEmulator

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE_INTERVAL_S = 1
BATCH = 100


class DeployedPrometheus(PrometheusServer):
    """Debian's Prometheus running deploy/prometheus/prometheus.yml and alerts.yml, with
    the test's target, a 1 s scrape interval, and optionally a test Alertmanager."""

    def __init__(
        self,
        targets: list[str],
        tmp_path: Path,
        *,
        rules: Path = RULES,
        alertmanager: str | None = None,
    ) -> None:
        super().__init__(targets, tmp_path, f"{SCRAPE_INTERVAL_S}s", rule_files=[rules])
        self.alertmanager = alertmanager

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(
            scrape_interval=self.scrape_interval, evaluation_interval=self.scrape_interval
        )
        config["rule_files"] = [str(p) for p in self.rule_files]
        (job,) = config["scrape_configs"]
        job.update(scrape_interval=self.scrape_interval, scrape_timeout=self.scrape_interval)
        job["static_configs"] = [{"targets": self.targets}]
        if self.alertmanager is None:
            del config["alerting"]
        else:
            config["alerting"]["alertmanagers"] = [
                {"static_configs": [{"targets": [self.alertmanager]}]}
            ]
        return config


def service_config(emulator: SlackEmulator) -> str:
    """TOML for `spikewatch serve`: fast jobs, Slack on the emulator (token from the env)."""
    return (
        "[service]\nstall_check_interval_s = 1\n"
        f'[slack]\nchannel = "#alerts"\nbase_url = "{emulator.url}/api/"\n'
        "timeout_s = 2\nmax_retries = 1\n"
    )


def service_env() -> dict[str, str]:
    # slack_sdk would send loopback traffic through a proxy from the environment.
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")
    return {"SLACK_BOT_TOKEN": SLACK_TOKEN, "NO_PROXY": "*", **dict.fromkeys(proxies, "")}


class TrainerClient:
    """Plays the trainer-side client over real HTTP: batches, sequence numbers, acks."""

    def __init__(self, service: ServiceProcess, run: str) -> None:
        self.service, self.run, self.seq = service, run, 0

    def send(self, losses: list[float], start: int, end: int, **extra: Any) -> dict[str, Any]:
        records = [
            {"step": s, "loss": losses[s], "grad_norm": 1.0 + 0.01 * (s % 7), "lr": 3e-4}
            for s in range(start, end)
        ]
        body = {"records": records, "client": f"{self.run}-client", "seq": self.seq, **extra}
        status, answer = self.service.post(f"/v1/runs/{self.run}/records", body)
        assert status == 200, answer
        self.seq += 1
        return dict(answer)


def spike_roll_back_and_nan(trainer: TrainerClient, prometheus: PrometheusServer) -> int:
    """The jump at `ONSET`, the rollback the service orders, then one NaN loss.

    Each step is left for Prometheus to scrape before the next, as it would be in a
    real run (minutes apart); returns the last step sent.
    """
    answer = trainer.send(SPIKING, ONSET, ONSET + BATCH)
    (command,) = answer["commands"]
    assert command["action"] == "rollback", answer
    prometheus.wait_for(f'spikewatch_incidents_total{{run="{trainer.run}"}} >= 1', timeout=10)
    restart = int(command["rollback_before_step"]) + 1
    trainer.send(HEALTHY, restart, restart + BATCH, acks=[command["id"]], rewind_to=restart)
    prometheus.wait_for(f'spikewatch_rollbacks_total{{run="{trainer.run}"}} == 1', timeout=10)
    nan_step = restart + BATCH
    losses = {nan_step: math.nan}
    trainer.send([losses.get(s, HEALTHY[s]) for s in range(nan_step + 1)], nan_step, nan_step + 1)
    prometheus.wait_for(f'spikewatch_skipped_steps_total{{run="{trainer.run}"}} >= 1', timeout=10)
    trainer.send(HEALTHY, nan_step + 1, nan_step + 1 + BATCH)
    return nan_step + BATCH
