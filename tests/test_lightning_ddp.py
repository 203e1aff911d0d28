"""SpikewatchCallback under Lightning DDP (2 CPU processes, gloo): one rank's bad shard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from service_process import TOKEN, ServiceProcess
from test_lightning_callback import (
    BATCH,
    CLASSES,
    DATA_BATCHES,
    POISON_BATCHES,
    POISON_START,
    STEPS,
    Classifier,
    guard_callback,
    make_data,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


class Recorder(pl.Callback):
    """Writes each rank's guard stats and parameters where the test can read them."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        guard = next(c for c in trainer.callbacks if hasattr(c, "engine"))  # type: ignore[attr-defined]
        rank = trainer.global_rank
        stats: dict[str, Any] = guard.stats
        Path(self.out, f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "rollbacks": stats["rollbacks"],
                    "ledger": stats["skip_ledger"],
                    "ranks": stats["last_incident_ranks"],
                    "step_count": guard.engine.step_count,
                    "lockstep": guard.engine.lockstep is not None,
                }
            )
        )
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        torch.save(flat, Path(self.out, f"params{rank}.pt"))


class RankShards(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item i is the current rank's shard of global batch i; rank 1's is bad in a range."""

    def __init__(self) -> None:
        self.x, self.y = make_data(2 * DATA_BATCHES).tensors

    def __len__(self) -> int:
        return DATA_BATCHES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rank = torch.distributed.get_rank()
        rows = slice((2 * i + rank) * BATCH, (2 * i + rank + 1) * BATCH)
        y = self.y[rows]
        if rank == 1 and POISON_START <= i < POISON_START + POISON_BATCHES:
            y = (y + 3) % CLASSES  # a corrupted shard, on one rank only
        return self.x[rows], y


def _fit(
    out: Path, monitor_url: str | None = None, token: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[guard_callback(monitor_url, token), Recorder(str(out))],
        use_distributed_sampler=False,  # the dataset shards by rank itself
    )
    trainer.fit(Classifier(), DataLoader(RankShards(), batch_size=None, shuffle=False))
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert torch.equal(torch.load(out / "params0.pt"), torch.load(out / "params1.pt"))
    return r0, r1


def test_ddp_ranks_roll_back_alike(tmp_path: Path) -> None:
    r0, r1 = _fit(tmp_path)
    assert r0["rollbacks"] >= 1
    assert r0 == r1  # same rollbacks, ledger, attribution and step on both ranks
    assert r0["lockstep"]
    assert r0["step_count"] == STEPS
    start, stop = r0["ledger"][0]
    assert start <= POISON_START and stop >= POISON_START + POISON_BATCHES
    assert "rank(s) [1] saw it" in r0["ranks"]


def test_ddp_ranks_report_once_to_the_service(tmp_path: Path) -> None:
    with ServiceProcess(tmp_path) as svc:  # the callback is pickled into 2 spawned ranks
        r0, r1 = _fit(tmp_path, monitor_url=svc.url, token=TOKEN)
        _, run = svc.get("/v1/runs/mlp")
        _, incidents = svc.get("/v1/runs/mlp/incidents")
    assert r0 == r1 and r0["rollbacks"] >= 1 and r0["step_count"] == STEPS
    assert run["decides"] == "trainer" and run["state"] == "finished"
    assert run["rollbacks"] == r0["rollbacks"]  # one client: counted once, not per rank
    assert run["last_step"] == STEPS - 1
    assert any(i["action"] == "rollback" for i in incidents["incidents"])
