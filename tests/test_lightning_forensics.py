"""Forensics in a real Lightning ``Trainer``: an MLP classifier on CPU.

After a rollback the callback re-evaluates the suspect batches (kept at
``on_train_batch_start``) forward only from the restored state with the module's own
``probe_loss(batch)``, and the verdict decides the next step: shifted labels are
``data`` (named by dataset index, quarantined), a 30x learning-rate jump is ``state``
(the LR is cut at that first rollback). The dataset indices come from a recorder on
the training DataLoader that `LedgerLoader` reads, which must not change the data order.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from torch.nn import functional

from lightning_forensics_task import Plain, Rollbacks, Task, fit, guard
from spikewatch.errors import ConfigError
from spikewatch_hooks.adapters.lightning import SpikewatchCallback

log = logging.getLogger(__name__)
T = Task()
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*dataloader is not resumable"),
    # The short runs keep the 300-step run's rollback settings: no rollback is expected.
    pytest.mark.filterwarnings("ignore::spikewatch_hooks.core.run_length.RunLengthWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _torch_settings(one_torch_thread: None) -> Iterator[None]:
    # deterministic=True flips a global flag: put it back.
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def data_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The shifted-label run with forensics and a quarantine file (trained once)."""
    quarantine = tmp_path_factory.mktemp("data") / "quarantine.jsonl"
    callback = guard(T, quarantine_file=quarantine)
    rollbacks = Rollbacks(callback)
    fit(T, "data", [callback, rollbacks])
    return {"stats": callback.stats, "rollbacks": rollbacks.seen, "quarantine": quarantine}


def test_shifted_labels_are_blamed_on_the_data_and_named(data_run: dict[str, Any]) -> None:
    stats, verdict = data_run["stats"], data_run["stats"]["last_verdict"]
    assert data_run["rollbacks"] == [{"cause": "data", "lr_scale": 1.0, "step": 220}]
    assert (stats["rollbacks"], stats["halted"], verdict["cause"]) == (1, False, "data")
    poisoned = set(T.poisoned) & T.samples_at(verdict["suspect_positions"])
    named = {s["index"] for s in verdict["samples"]}
    hits = len(named & poisoned)
    precision, recall = hits / len(named), hits / len(poisoned)
    log.info("%d suspect batches, %d shifted samples in them, %d named: P %.3f R %.3f",
             len(verdict["suspect_positions"]), len(poisoned), len(named), precision,
             recall)  # fmt: skip
    # A classifier's per-sample loss is heavy-tailed (labels drawn from a teacher): only
    # shifted samples beyond every ordinary one are named, so none is named wrongly.
    assert precision == 1.0 and recall >= 0.5
    lines = [json.loads(line) for line in data_run["quarantine"].read_text().splitlines()]
    assert {e["index"] for e in lines} == named and stats["quarantined_samples"] == len(named)


def test_without_forensics_the_data_run_rolls_back_alike(data_run: dict[str, Any]) -> None:
    callback = guard(T, forensics=False)
    fit(T, "data", [callback])
    stats = callback.stats
    assert callback.engine is not None and callback.engine.forensics is None
    assert (stats["rollbacks"], stats["last_verdict"]) == (1, None)
    assert stats["skip_ledger"] == data_run["stats"]["skip_ledger"]


def test_a_learning_rate_jump_is_blamed_on_the_state_and_cut_at_once() -> None:
    """30x the LR from step 200 on, for good: forensics cuts it at the first rollback."""
    outcomes = {}
    for forensics in (True, False):
        callback = guard(T, forensics=forensics)
        rollbacks = Rollbacks(callback)
        fit(T, "lr", [callback, rollbacks])
        outcomes[forensics] = (callback.stats, rollbacks.seen)
    (probed, seen), (plain, plain_seen) = outcomes[True], outcomes[False]
    log.info("LR jump: %d rollbacks with forensics %s (halted %s), %d without %s (halted %s)",
             probed["rollbacks"], seen, probed["halted"], plain["rollbacks"], plain_seen,
             plain["halted"])  # fmt: skip
    assert seen[0] == {"cause": "state", "lr_scale": 0.5, "step": 180}
    assert plain_seen[0] == {"cause": None, "lr_scale": 1.0, "step": 180}
    assert probed["rollbacks"] < plain["rollbacks"]
    assert probed.get("quarantined_samples", 0) == 0


def per_sample(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    x, y, _ = batch
    return functional.cross_entropy(model.net(x), y, reduction="none")  # type: ignore[operator]


def test_without_a_probe_loss_forensics_is_off_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = replace(T, steps=20)
    callback = guard(s)
    with caplog.at_level(logging.INFO, logger="spikewatch_hooks"):
        fit(s, "none", [callback], module=Plain)
    assert "forensics is off: Plain has no probe_loss(batch) method" in caplog.text
    assert callback.engine is not None and callback.engine.forensics is None
    assert callback.stats["last_verdict"] is None
    given = guard(s, probe_loss=per_sample)  # the option instead of the method
    fit(s, "none", [given], module=Plain)
    assert given.engine is not None and given.engine.forensics is not None
    assert given.engine.forensics.loss_fn is per_sample
    assert given.stats["probe_cache_batches"] == 20


class IndexCheck(pl.Callback):
    """After every batch: each batch in the probe's cache holds the samples its recorded
    dataset indices say (the third tensor, which the module never trains on)."""

    def __init__(self, watch: SpikewatchCallback) -> None:
        self.watch, self.checked, self.wrong = watch, 0, 0
        self._seen: set[int] = set()

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        assert self.watch.engine is not None and self.watch.engine.forensics is not None
        for entry in self.watch.engine.forensics.cache.entries():
            if entry.position not in self._seen:
                self._seen.add(entry.position)
                self.checked += 1
                self.wrong += entry.indices != tuple(entry.batch[2].tolist())


def test_indices_follow_a_seeded_shuffle_across_epochs_and_a_resume(tmp_path: Path) -> None:
    """Epochs of 25 shuffled batches; the run is resumed from step 60, mid-epoch (Lightning
    restarts the epoch: the callback passes over its first 10 batches)."""
    s = replace(T, steps=60, batches=25)
    first = guard(s)
    check = IndexCheck(first)
    _, trainer = fit(s, "none", [first, check], shuffle=True)
    assert (check.checked, check.wrong) == (60, 0)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    resumed = guard(s)
    check = IndexCheck(resumed)
    fit(s, "none", [resumed, check], shuffle=True, max_steps=80,
        ckpt_path=str(tmp_path / "run.ckpt"))  # fmt: skip
    assert (check.checked, check.wrong) == (20, 0)


def test_forensics_leaves_the_data_order_and_the_weights_as_they_were() -> None:
    """A healthy run on a seeded shuffle: the same weights, bit for bit, with the index
    recorder and batch cache as without them."""
    s = replace(T, steps=120)
    weights = []
    for forensics in (True, False):
        callback = guard(s, forensics=forensics)
        model, _ = fit(s, "none", [callback], shuffle=True)
        assert (callback.stats["rollbacks"], callback.stats["skipped_steps"]) == (0, 0)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_a_quarantine_file_drops_its_samples_from_a_later_run(
    data_run: dict[str, Any], tmp_path: Path
) -> None:
    """The named samples are dropped row by row from a new run of the same data (any
    sample named in it is a shifted one too)."""
    named = {s["index"] for s in data_run["stats"]["last_verdict"]["samples"]}
    quarantine = tmp_path / "quarantine.jsonl"
    shutil.copy(data_run["quarantine"], quarantine)
    callback = guard(T, quarantine_file=quarantine)
    fit(T, "data", [callback])
    stats = callback.stats
    assert stats["quarantined_samples_skipped"] == len(named)
    assert callback.engine is not None and callback.engine.forensics is not None
    log.info("rerun with the quarantine: %d rollbacks, verdict %s", stats["rollbacks"],
             stats["last_verdict"] and stats["last_verdict"]["cause"])  # fmt: skip
    assert named <= callback.engine.forensics.quarantined <= set(T.poisoned)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"probe_cache_batches": 0}, "probe_cache_batches=0"),
        ({"probe_cache_bytes": -1}, "probe_cache_bytes=-1"),
        ({"probe_loss": 3}, "probe_loss=3"),
    ],
)
def test_bad_forensics_options_fail_at_construction(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SpikewatchCallback(**options)


def test_stats_before_training_carry_the_verdict_slot() -> None:
    assert SpikewatchCallback().stats["last_verdict"] is None
