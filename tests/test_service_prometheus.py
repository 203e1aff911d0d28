"""A real `spikewatch serve` process fed a spiking run over HTTP, scraped by a real Prometheus.

Everything is checked through Prometheus's query API, i.e. as dashboards and alert rules
will see it. A missing binary is an error, never a skip.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forensics_trainer import judged_rollback
from prometheus_server import PROMETHEUS, PROMTOOL, PrometheusServer, require_binary, sample_value
from service_client import HEALTHY, SPIKING
from service_process import TOKEN, ServiceProcess

RUN = "prom-run"


class HttpTrainer:
    """Sends batches of 100 to the service process as the trainer-side client would."""

    def __init__(self, service: ServiceProcess, run: str = RUN) -> None:
        self.service, self.run, self.seq, self.last_loss = service, run, 0, float("nan")

    def send(self, losses: list[float], start: int, end: int, **extra: Any) -> dict[str, Any]:
        records = [{"step": s, "loss": losses[s]} for s in range(start, end)]
        body = {"records": records, "client": "t1", "seq": self.seq, **extra}
        status, answer = self.service.post(f"/v1/runs/{self.run}/records", body)
        assert status == 200, answer
        self.seq += 1
        self.last_loss = losses[end - 1]
        return dict(answer)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with ServiceProcess(tmp_path_factory.mktemp("service")) as svc:
        yield svc


def test_promtool_finds_no_problems_in_the_service_metrics(service: ServiceProcess) -> None:
    HttpTrainer(service, "lint").send(HEALTHY, 0, 10)  # so per-run families have samples
    status, body = service.get("/metrics")
    assert status == 200
    assert 'spikewatch_loss{run="lint"}' in body
    done = subprocess.run(
        [str(require_binary(PROMTOOL)), "check", "metrics"],
        input=body.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def value(prom: PrometheusServer, expr: str, want: float, timeout: float = 15.0) -> float:
    """Wait until ``expr`` has exactly one sample equal to ``want``; return it."""
    result = prom.wait_for(
        expr, lambda r: len(r) == 1 and sample_value(r[0]) == want, timeout=timeout
    )
    return sample_value(result[0])


def test_prometheus_sees_the_spike_the_rollback_and_the_latest_values(
    service: ServiceProcess, tmp_path: Path
) -> None:
    require_binary(PROMETHEUS)
    trainer = HttpTrainer(service)
    for b in range(6):
        answer = trainer.send(SPIKING, 100 * b, 100 * b + 100)
    (cmd,) = answer["commands"]
    assert cmd["action"] == "rollback"
    sent = 600
    run = f'{{run="{RUN}"}}'
    with PrometheusServer([f"127.0.0.1:{service.port}"], tmp_path, "1s") as prom:
        assert value(prom, f"spikewatch_records_total{run}", sent) == sent
        assert value(prom, f"spikewatch_loss{run}", trainer.last_loss) == trainer.last_loss
        spikes = prom.query(f'spikewatch_signals_total{{run="{RUN}",kind="spike"}}')
        assert [sample_value(s) for s in spikes] == [1.0]
        assert value(prom, f"spikewatch_rollbacks_total{run}", 0) == 0

        restart = cmd["rollback_before_step"] + 1
        trainer.send(HEALTHY, restart, restart + 100, acks=[cmd["id"]], rewind_to=restart)
        assert value(prom, f"spikewatch_rollbacks_total{run}", 1) == 1
        assert value(prom, f"spikewatch_records_total{run}", sent + 100) == sent + 100
        assert value(prom, f"spikewatch_loss{run}", trainer.last_loss) == HEALTHY[restart + 99]
        skipped = prom.query(f"spikewatch_skipped_batches_total{run}")
        assert [sample_value(s) for s in skipped] == [600 - restart + cmd["skip_ahead"]]
        (stamp,) = prom.query(f"spikewatch_last_record_timestamp_seconds{run}")
        assert abs(sample_value(stamp) - time.time()) < 30
        stale = prom.query(f"time() - spikewatch_last_record_timestamp_seconds{run} < 60")
        assert [s["metric"]["run"] for s in stale] == [RUN]
        (state,) = prom.query(f'spikewatch_run_state{{run="{RUN}",state="active"}}')
        assert sample_value(state) == 1


def test_prometheus_counts_the_trainers_verdicts_by_cause(
    service: ServiceProcess, tmp_path: Path
) -> None:
    require_binary(PROMETHEUS)
    judged_rollback(service.url, "prom-verdicts", TOKEN, cause="data")
    with PrometheusServer([f"127.0.0.1:{service.port}"], tmp_path, "1s") as prom:
        wanted = 'spikewatch_verdicts_total{run="prom-verdicts",cause="data"}'
        assert value(prom, wanted, 1) == 1
        # Every cause is exported from the first verdict on (0 until it happens), so
        # increase() over a cause works before its first verdict.
        by_cause = prom.query('spikewatch_verdicts_total{run="prom-verdicts"}')
        assert {s["metric"]["cause"]: sample_value(s) for s in by_cause} == {
            "data": 1.0, "state": 0.0, "unknown": 0.0
        }  # fmt: skip
        assert {s["metric"]["job"] for s in by_cause} == {"spikewatch"}
