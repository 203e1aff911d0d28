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

pytest.importorskip("torch.distributed.run")
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _json_line(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"expected one JSON line from rank 0, got:\n{stdout}"
    result: dict[str, Any] = json.loads(lines[0])
    return result


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to python")
def test_a_bad_shard_on_rank_1_is_rolled_back_on_both_ranks(repo: Path) -> None:
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "examples/ddp_train.py"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    result = _json_line(done.stdout)
    assert result["world_size"] == 2
    assert result["rollbacks"] >= 1
    assert result["params_identical_across_ranks"] is True
    assert result["incident_ranks"] == [1]
    assert result["steps"] == 300
    assert math.isfinite(result["final_loss"])
    assert result["healthy"] is True
    assert "rolled back" in done.stderr  # rank 0 logged the rollback (once: rank 1 is silent)
    assert done.stderr.count("spikewatch: rolled back") == result["rollbacks"]
