"""`spikewatch serve` as a person starts it: a busy port, and the API docs offline."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from service_process import TOKEN
from spikewatch.service.app import create_app
from spikewatch.service.config import ServiceConfig
from spikewatch.service.core import Service


def test_a_busy_port_fails_first_and_creates_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        db = tmp_path / "events.db"
        done = subprocess.run(
            [sys.executable, "-m", "spikewatch.cli", "serve", "--port", str(port), "--db", str(db)],
            env={**os.environ, "SPIKEWATCH_TOKEN": TOKEN}, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"port {port} on 127.0.0.1 cannot be used" in done.stderr
    assert "pass another --port" in done.stderr
    assert "Application startup" not in done.stderr  # it never started
    assert not db.exists() and list(tmp_path.iterdir()) == []


def test_the_api_docs_load_without_a_network(tmp_path: Path) -> None:
    service = Service(ServiceConfig(db=str(tmp_path / "e.db")), token=TOKEN)
    client = TestClient(create_app(service))
    pages = {path: client.get(path) for path in ("/docs", "/redoc")}
    service.stop()
    for page in pages.values():
        assert page.status_code == 200
        assert "cdn." not in page.text and "https://" not in page.text.split("<body>")[0]
    docs = pages["/docs"].text
    [script] = [part.split('"')[0] for part in docs.split('src="')[1:] if ".js" in part]
    [css] = [part.split('"')[0] for part in docs.split('href="')[1:] if ".css" in part]
    service = Service(ServiceConfig(db=str(tmp_path / "e2.db")), token=TOKEN)
    client = TestClient(create_app(service))
    js, sheet = client.get(script), client.get(css)
    service.stop()
    assert js.status_code == 200 and len(js.content) > 100_000  # the Swagger UI bundle
    assert sheet.status_code == 200 and "swagger" in sheet.text[:5000].lower()
