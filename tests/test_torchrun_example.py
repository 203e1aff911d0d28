"""examples/ddp_train.py under a real ``torchrun`` (2 gloo ranks on the CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service_process import TOKEN, ServiceProcess

pytest.importorskip("torch.distributed.run")
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _json_line(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"expected one JSON line from rank 0, got:\n{stdout}"
    result: dict[str, Any] = json.loads(lines[0])
    return result


def _torchrun(repo: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "examples/ddp_train.py", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        check=False,
    )


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to python")
def test_a_bad_shard_on_rank_1_is_rolled_back_on_both_ranks(repo: Path) -> None:
    done = _torchrun(repo)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    result = _json_line(done.stdout)
    assert result["world_size"] == 2
    assert result["rollbacks"] >= 1
    assert result["params_identical_across_ranks"] is True
    assert result["incident_ranks"] == [1]
    assert result["steps"] == 300
    assert math.isfinite(result["final_loss"])
    assert result["healthy"] is True
    assert result["snapshot_bytes"] > 0
    assert "rolled back" in done.stderr  # rank 0 logged the rollback (once: rank 1 is silent)
    assert done.stderr.count("spikewatch: rolled back") == result["rollbacks"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to python")
def test_a_distributed_run_reports_once_to_the_service(repo: Path, tmp_path: Path) -> None:
    with ServiceProcess(tmp_path) as svc:
        done = _torchrun(repo, "--monitor-url", svc.url, env={"SPIKEWATCH_TOKEN": TOKEN})
        _, metrics = svc.request("GET", "/metrics", token=None)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    result = _json_line(done.stdout)
    assert result["rollbacks"] >= 1 and result["params_identical_across_ranks"] is True
    assert result["incident_ranks"] == [1]
    service = result["service"]
    # One client (rank 0): every step's record once, the trainer's rollback counted once.
    assert service["decides"] == "trainer"
    assert service["last_step"] == result["steps"] - 1
    assert service["rollbacks"] == result["rollbacks"]
    assert any(i["action"] == "rollback" for i in service["incidents"])
    assert f'spikewatch_rollbacks_total{{run="ddp-example"}} {result["rollbacks"]}.0' in metrics
