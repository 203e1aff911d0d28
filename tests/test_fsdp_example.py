"""examples/fsdp_train.py under a real ``torchrun`` (FSDP2 on 2 gloo ranks on the CPU):
one rollback; the guarded run ends near the clean one, the unguarded one far from it;
its DCP checkpoint resumes on 2 ranks and on 1, honouring the skip ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO

TORCHRUN = Path(sys.executable).with_name("torchrun")
SAVE_AT = 140  # after the rollback (at ~step 127): the ledger holds the bad range


def _torchrun(repo: Path, ranks: int, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}", "examples/fsdp_train.py",
         *args],
        cwd=repo, capture_output=True, text=True, timeout=400,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"expected one JSON line from rank 0, got:\n{done.stdout}"
    result: dict[str, Any] = json.loads(lines[0])
    result["stderr"] = done.stderr
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    folder = tmp_path_factory.mktemp("fsdp-example") / "ckpt"
    return _torchrun(REPO, 2, "--save-at", str(SAVE_AT), "--checkpoint", str(folder)), folder


def _in_ledger(positions: list[int], ledger: list[list[int]]) -> list[int]:
    return [p for p in positions if any(a <= p < b for a, b in ledger)]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to python")
def test_a_sharded_run_rolls_back_once_and_ends_near_the_clean_run(
    run: tuple[dict[str, Any], Path],
) -> None:
    result, _ = run
    assert set(result) >= {
        "world_size", "rollbacks", "clean_final_loss", "unguarded_final_loss",
        "guarded_final_loss", "snapshot_bytes",
    }  # fmt: skip
    assert result["world_size"] == 2 and result["rollbacks"] == 1 and not result["halted"]
    clean = result["clean_final_loss"]
    assert result["guarded_final_loss"] <= 1.05 * clean
    assert result["unguarded_final_loss"] >= 1.20 * clean
    ((start, stop),) = result["skip_ledger"]
    assert start <= 105 and stop >= 130  # the bad range (Settings.bad_start, bad_batches)
    assert result["stderr"].count("spikewatch: rolled back") == 1  # rank 0 logs, once
    assert result["snapshot_bytes"] > 0
    assert result["verdict"] == "data"  # random labels: both ranks' shards stand out


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to python")
@pytest.mark.parametrize("ranks", [2, 1])
def test_the_checkpoint_resumes_on_any_world_size_and_honours_the_ledger(
    repo: Path, run: tuple[dict[str, Any], Path], ranks: int
) -> None:
    first, folder = run
    resumed = _torchrun(repo, ranks, "--resume", str(folder))
    assert resumed["world_size"] == ranks and resumed["steps"] == 150
    assert resumed["skip_ledger"] == first["skip_ledger"]
    assert resumed["trained_positions"] == first["trained_positions"][-(150 - SAVE_AT) :]
    assert not _in_ledger(resumed["trained_positions"], resumed["skip_ledger"])
    # The same global batches, the same state: the same model (1 rank: within rounding).
    assert abs(resumed["guarded_final_loss"] - first["guarded_final_loss"]) < 1e-4
