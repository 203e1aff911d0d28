"""Run a real ``spikewatch serve`` process for tests: free port, temp db, wait for /healthz."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_server import free_port

TOKEN = "test-token-0123456789"


class ServiceProcess:
    """``spikewatch serve`` in a subprocess; restartable on the same port and database.

    Example (not run here):
        with ServiceProcess(tmp_path) as svc:
            svc.post("/v1/runs/r/records", {"records": [...]})
            svc.kill()      # SIGKILL
            svc.start()     # same port, same db
    """

    def __init__(
        self,
        tmp_path: Path,
        *,
        config: str = "",
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = tmp_path / "events.db"
        self.config_path = tmp_path / "service.toml"
        self.config_path.write_text(config)
        self.env = {**os.environ, "SPIKEWATCH_TOKEN": TOKEN, **(env or {})}
        self.log_path = tmp_path / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until /healthz answers."""
        cmd = [
            sys.executable, "-m", "spikewatch.cli", "serve", "--port", str(self.port),
            "--db", str(self.db), "--config", str(self.config_path),
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"spikewatch serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"spikewatch serve did not answer /healthz in {timeout} s:\n{self.log()}"
        )

    def log(self) -> str:
        """The service's output so far."""
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush (what a crash or OOM kill looks like)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def request(
        self, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN
    ) -> tuple[int, Any]:
        """One HTTP request; returns (status, parsed JSON or text)."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=30) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> tuple[int, Any]:
        """GET without a token."""
        return self.request("GET", path, token=None)

    def post(self, path: str, data: Any, token: str | None = TOKEN) -> tuple[int, Any]:
        """POST ``data`` as JSON (NaN as a literal, like the trainer's client)."""
        return self.request("POST", path, json.dumps(data).encode(), token)

    def __enter__(self) -> ServiceProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
