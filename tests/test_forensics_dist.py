"""Forensics under torch.distributed: two gloo ranks, DDP, each rank probes its own shard
of the suspect batches; the verdict is reduced so both ranks act alike."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spikewatch_hooks.demo.forensics_runs import ForensicsSettings, run
from spikewatch_hooks.demo.scenario import load_corpus

S = ForensicsSettings()


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    corpus = load_corpus()
    results = {}
    for scenario in ("random", "lr"):
        r = run(scenario, S, corpus)
        results[scenario] = {
            "verdict": r.stats["last_verdict"],
            "rollbacks": r.stats["rollbacks"],
            "state_verdicts": r.stats.get("verdicts_state", 0),
            "lr_scale": r.stats["lr_scale"],
            "ledger": r.stats["skip_ledger"],
            "named": sorted(r.named),
            "poisoned": sorted(r.poisoned),
            "final_loss": r.final_loss,
            "weights": r.checksum,
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_every_rank_probes_its_shard_and_reaches_the_same_verdict(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)  # type: ignore[attr-defined,no-untyped-call]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    data, lr = ranks[0]["random"], ranks[0]["lr"]
    assert ranks[0] == ranks[1]  # verdicts, ledgers, named samples, final loss: alike
    assert data["verdict"]["cause"] == "data" and data["rollbacks"] == 1
    named, poisoned = set(data["named"]), set(data["poisoned"])
    # each rank's shard holds every other sample: both halves are named
    assert {i % 2 for i in named} == {0, 1}
    assert len(named & poisoned) / len(named) >= 0.9
    probed = set(data["verdict"]["suspect_positions"])
    truth = {i for i in poisoned if (i // 2) // S.batch_size in probed}
    assert len(named & truth) / len(truth) >= 0.9
    # every probe blamed the state; the first one cut the LR on the first rollback
    assert lr["verdict"]["cause"] == "state" and lr["state_verdicts"] == lr["rollbacks"]
    # (without the probe the first rollback keeps the LR: 0.5 ** (rollbacks - 1))
    assert lr["lr_scale"] == 0.5 ** lr["rollbacks"]
