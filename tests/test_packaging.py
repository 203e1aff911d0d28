"""The two source roots must never ship or shadow a package named `watchdog` or `hooks`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.parametrize("root", ["watchdog", "hooks"])
def test_source_roots_are_not_packages(root: str) -> None:
    assert not (REPO / root / "__init__.py").exists()


def test_wheel_ships_only_our_packages(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
    )
    [wheel] = tmp_path.glob("spikewatch-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"spikewatch", "spikewatch_hooks"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "spikewatch/py.typed" in names
    assert "spikewatch_hooks/py.typed" in names


def test_pypi_watchdog_still_works_beside_us(tmp_path: Path) -> None:
    # Run from the repo root, where a bare `watchdog/` folder sits on sys.path[0]:
    # the real library must still win, and its observer must see a file appear.
    code = (
        "import sys, time, pathlib, spikewatch, spikewatch_hooks\n"
        "import watchdog\n"
        "from watchdog.observers import Observer\n"
        "from watchdog.events import FileSystemEventHandler\n"
        "seen = []\n"
        "class H(FileSystemEventHandler):\n"
        "    def on_created(self, event): seen.append(event.src_path)\n"
        "obs = Observer(); obs.schedule(H(), sys.argv[1]); obs.start()\n"
        "time.sleep(0.2); pathlib.Path(sys.argv[1], 'new.txt').write_text('x')\n"
        "deadline = time.time() + 5\n"
        "while not seen and time.time() < deadline: time.sleep(0.05)\n"
        "obs.stop(); obs.join()\n"
        "print(watchdog.__file__); print(len(seen))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "site-packages" in out[0]
    assert int(out[1]) >= 1


def test_spikewatch_core_never_imports_torch() -> None:
    code = (
        "import sys, spikewatch.monitor, spikewatch.replay.analyze, spikewatch.cli\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
