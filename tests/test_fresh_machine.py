"""The README's test command on a machine without the real-component binaries.

Without root (or off Debian) `scripts/setup.sh` cannot install Prometheus and
Alertmanager: the tests that run them are then skipped, each saying why; under CI
(``CI=true``), where they are installed, the same run fails instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pytest_without_binaries(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPIKEWATCH_TEST_BIN_DIR": str(tmp_path / "no-binaries"), "CI": ci}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "tests/test_deploy_rules.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_binaries_are_skips_that_say_why_and_failures_under_ci(
    tmp_path: Path, ci: str
) -> None:
    done = _pytest_without_binaries(tmp_path, ci)
    out = done.stdout + done.stderr
    assert "promtool is missing: run `bash scripts/install_system.sh`" in out, out[-3000:]
    if ci:
        assert done.returncode == 1, out[-3000:]
        assert " failed" in out and "skipped" not in out.splitlines()[-1]
    else:
        assert done.returncode == 0, out[-3000:]
        assert "SKIPPED" in out and " skipped" in out.splitlines()[-1]


def test_setup_goes_on_without_root_but_not_under_ci(tmp_path: Path) -> None:
    """`install_system.sh` failing (no root, no apt): setup continues, unless CI=true."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "setup.sh").write_text((REPO / "scripts" / "setup.sh").read_text())
    (scripts / "install_system.sh").write_text("echo 'install_system.sh: not root' >&2; exit 1\n")
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    fake_python = venv / "python"  # an installed venv: only the pip step runs, as a no-op
    fake_python.write_text('#!/bin/sh\n[ "$1" = "-c" ] && echo 0.0 || true\n')
    fake_python.chmod(0o755)
    runs = {
        ci: subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True,
                           text=True, env={**os.environ, "CI": ci}, check=False, timeout=60)
        for ci in ("", "true")
    }  # fmt: skip
    assert runs[""].returncode == 0, runs[""].stderr
    assert "going on without them" in runs[""].stderr
    assert runs["true"].returncode == 1
    assert "CI=true and the real-component binaries are missing" in runs["true"].stderr
