"""A real Prometheus for tests: generated config, loopback only, every file under ``tmp_path``.

Not a pytest plugin: tests import what they need. `serve_metrics` puts a ``/metrics``
endpoint on a thread, `PrometheusServer` starts Debian's ``/usr/bin/prometheus`` to
scrape it and answers PromQL through the HTTP API::

    registry = build_registry(collector)
    with serve_metrics(lambda: render(registry)) as target:
        with PrometheusServer([target], tmp_path) as prom:
            loss = prom.wait_for('spikewatch_loss{run="r1"}')
            assert sample_value(loss[0]) == 2.5

The first scraped sample is queryable a few seconds after start; budget ~10 s.
A missing binary is an error, never a skip: the tests exist to run the real thing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

#: Where Debian puts the real components (a test of the set-up points it elsewhere).
BIN_DIR = Path(os.environ.get("SPIKEWATCH_TEST_BIN_DIR", "/usr/bin"))
PROMETHEUS = BIN_DIR / "prometheus"
PROMTOOL = BIN_DIR / "promtool"
INSTALL_HINT = (
    "run `bash scripts/install_system.sh` (Debian packages prometheus, prometheus-alertmanager)"
)

Sample = dict[str, Any]
"""One element of a PromQL result: ``{"metric": {labels}, "value": [time, "text"]}``."""

# Loopback only: a proxy from the environment must never see test traffic.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def require_binary(path: Path) -> Path:
    """``path`` if it is an executable file; else the test is skipped, saying how to
    install it — or, under CI (``CI=true``), where the components are installed, fails:
    nothing may hide behind a skip there.

    Example:
        >>> require_binary(Path("/bin/sh"))
        PosixPath('/bin/sh')
    """
    if path.is_file() and os.access(path, os.X_OK):
        return path
    message = f"{path} is missing: {INSTALL_HINT}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a real component must be there)", pytrace=False)
    pytest.skip(message)


def in_ci() -> bool:
    """Whether this is a CI run (``CI`` set to true, as CI services do)."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Example:
        >>> 1024 <= free_port() <= 65535
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample_value(sample: Sample) -> float:
    """The value of one instant-vector sample (``NaN`` and ``+Inf`` included).

    Example:
        >>> sample_value({"metric": {}, "value": [1700000000.0, "NaN"]})
        nan
    """
    return float(sample["value"][1])


def http_get(url: str, *, timeout: float = 5.0) -> bytes:
    """GET ``url`` without any proxy; HTTP errors raise ``urllib.error.HTTPError``."""
    with _OPENER.open(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Keep scrape logs out of the test output."""


@contextmanager
def serve_metrics(render: Callable[[], tuple[bytes, str]]) -> Iterator[str]:
    """Serve ``render()`` (body, content type) at ``/metrics`` on 127.0.0.1, on a thread.

    Yields the scrape target ``"127.0.0.1:<port>"``; the server is shut down on exit.

    Example:
        >>> with serve_metrics(lambda: (b"up_test 1\\n", "text/plain")) as target:
        ...     http_get(f"http://{target}/metrics")
        b'up_test 1\\n'
    """

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics here\n"]
        body, content_type = render()
        start_response(
            "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        )
        return [body]

    server = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class PrometheusServer:
    """Debian's Prometheus on a free loopback port, scraping ``targets`` as job ``spikewatch``.

    Args:
        targets: ``host:port`` scrape targets (served at ``/metrics``).
        tmp_path: where the config, the TSDB and the log go (nothing is written elsewhere).
        scrape_interval: scrape (and rule evaluation) interval, a Prometheus duration.
        rule_files: recording/alerting rule files to load.
        start_timeout: seconds to wait for ``/-/ready``.
    """

    def __init__(
        self,
        targets: list[str],
        tmp_path: Path,
        scrape_interval: str = "1s",
        *,
        rule_files: Sequence[Path] = (),
        start_timeout: float = 30.0,
    ) -> None:
        self.targets = list(targets)
        self.tmp_path = Path(tmp_path)
        self.scrape_interval = scrape_interval
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.start_timeout = start_timeout
        self.port = 0
        self.log_path = self.tmp_path / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the HTTP API, e.g. ``http://127.0.0.1:40123``."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def config(self) -> dict[str, Any]:
        """The generated configuration (written as JSON, which is valid YAML)."""
        interval = self.scrape_interval
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": "spikewatch",
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def start(self) -> None:
        """Start Prometheus and wait until it is ready; raise with its log tail if it is not."""
        binary = require_binary(PROMETHEUS)
        config_path = self.tmp_path / "prometheus.yml"
        config_path.write_text(json.dumps(self.config(), indent=2))
        for attempt in range(3):
            self.port = free_port()
            self._launch(binary, config_path)
            try:
                self._wait_ready()
                return
            except RuntimeError:
                self.stop()
                # Another process may have taken the port between free_port() and bind.
                if "address already in use" not in self.log_tail() or attempt == 2:
                    raise

    def _launch(self, binary: Path, config_path: Path) -> None:
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                str(binary),
                f"--config.file={config_path}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={self.tmp_path / 'tsdb'}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited at start-up:\n{self.log_tail()}")
            try:
                http_get(f"{self.url}/-/ready", timeout=1.0)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError(
            f"prometheus was not ready within {self.start_timeout} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Terminate Prometheus (kill it after 10 s); safe to call twice."""
        stop_process(self._proc, self._log)
        self._proc = self._log = None

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines Prometheus wrote (stdout and stderr)."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; a rejected request raises."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            body = http_get(f"{self.url}/api/v1/{path}{query}")
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise RuntimeError(f"Prometheus rejected {path} {params}: {detail}") from err
        return json.loads(body)["data"]

    def query(self, expr: str) -> list[Sample]:
        """Evaluate a PromQL instant query; a scalar comes back as one sample without labels."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[Sample] = data["result"]
        return result

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[Sample]], bool] = bool,
        timeout: float = 15.0,
    ) -> list[Sample]:
        """Poll ``query(expr)`` until ``predicate(result)`` holds (default: non-empty)."""
        deadline = time.monotonic() + timeout
        result = self.query(expr)
        while not predicate(result):
            if time.monotonic() > deadline:
                health = [
                    (t["scrapeUrl"], t["health"], t["lastError"]) for t in self.targets_info()
                ]
                raise TimeoutError(
                    f"{expr!r} gave {result} after {timeout} s; targets: {health}\n"
                    + self.log_tail(5)
                )
            time.sleep(0.25)
            result = self.query(expr)
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing), from ``/api/v1/alerts``."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def rule_groups(self) -> list[dict[str, Any]]:
        """Loaded rule groups with their health, from ``/api/v1/rules``."""
        groups: list[dict[str, Any]] = self.api("rules")["groups"]
        return groups

    def targets_info(self) -> list[dict[str, Any]]:
        """Active scrape targets with health and last error, from ``/api/v1/targets``."""
        targets: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return targets


def stop_process(proc: subprocess.Popen[bytes] | None, log: IO[bytes] | None = None) -> None:
    """Terminate a test's server process (kill it after 10 s) and close its log."""
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if log is not None:
        log.close()
