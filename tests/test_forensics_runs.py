"""Forensics on real CPU training (`TinyGPT`, demo/forensics_runs.py): bad data is
named and skipped with one rollback; a bad state gets its LR cut on the first rollback.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from spikewatch.forensics.quarantine import read
from spikewatch_hooks.demo.corpus import CharCorpus
from spikewatch_hooks.demo.forensics_runs import ForensicsSettings, ScenarioResult, run
from spikewatch_hooks.demo.scenario import load_corpus

S = ForensicsSettings()


@pytest.fixture(scope="module")
def runs(one_torch_thread: None) -> Iterator[functools._lru_cache_wrapper[ScenarioResult]]:
    corpus: CharCorpus = load_corpus()

    @functools.cache
    def get(name: str, mode: str = "probe") -> ScenarioResult:
        return run(
            name,  # type: ignore[arg-type]
            S,
            corpus,
            guarded=mode != "unguarded",
            probe=mode == "probe",
        )

    yield get


def _probed_poison(result: ScenarioResult) -> set[int]:
    verdict = result.stats["last_verdict"]
    probed = set(verdict["suspect_positions"])
    return {i for i in result.poisoned if i // S.batch_size in probed}


@pytest.mark.parametrize("poison", ["random", "shift"])
def test_bad_data_is_named_and_skipped_with_one_rollback(runs, poison: str) -> None:  # type: ignore[no-untyped-def]
    guarded, unguarded, clean = runs(poison), runs(poison, "unguarded"), runs("clean")
    verdict = guarded.stats["last_verdict"]
    assert verdict["cause"] == "data", verdict["why"]
    assert guarded.stats["rollbacks"] == 1
    named, truth = guarded.named, _probed_poison(guarded)
    assert len(truth) >= 64  # the probe saw a real share of the bad samples
    precision = len(named & guarded.poisoned) / len(named)
    recall = len(named & truth) / len(truth)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    assert verdict["suspect_loss"] > 1.5 * verdict["reference_loss"]
    # Rescued: near the never-poisoned run, where the unguarded one is not.
    assert guarded.final_loss < unguarded.final_loss
    assert guarded.final_loss < clean.final_loss * 1.01
    assert clean.stats["rollbacks"] == 0 and clean.stats["last_verdict"] is None


def test_a_learning_rate_jump_is_blamed_on_the_state_and_cut_at_once(runs) -> None:  # type: ignore[no-untyped-def]
    probed, blind = runs("lr"), runs("lr", "noprobe")
    verdict = probed.stats["last_verdict"]
    assert verdict["cause"] == "state", verdict["why"]
    assert verdict["samples"] == []
    assert verdict["action"] == "lr x0.5 now"
    assert probed.stats["verdicts_state"] == 1
    # Without the probe the first rollback keeps the LR and the divergence comes back.
    assert probed.stats["rollbacks"] == 1
    assert blind.stats["rollbacks"] > probed.stats["rollbacks"]
    assert not probed.stats["halted"]
    assert probed.final_loss < runs("lr", "unguarded").final_loss


def test_the_probe_costs_forward_passes_only_and_reports_them(runs) -> None:  # type: ignore[no-untyped-def]
    stats = runs("random").stats
    # suspect + reference batches, one forward pass each, bounded by the settings
    cfg = S.config().forensics
    assert 0 < stats["probe_forward_passes"] <= cfg.max_suspect + cfg.reference_batches
    assert 0.0 < stats["probe_seconds"] < cfg.max_seconds


def test_a_data_verdict_fills_the_quarantine_file(tmp_path: Path, one_torch_thread: None) -> None:
    file = tmp_path / "quarantine.jsonl"
    result = run("random", S, load_corpus(), quarantine_file=str(file))
    entries = read(file)
    assert {e.index for e in entries} == result.named
    assert all(
        e.run == "forensics-random" and e.loss > 2 * (e.reference_loss or 0) for e in entries
    )
    first = json.loads(file.read_text().splitlines()[0])
    assert set(first) == {
        "run", "step", "position", "index", "loss", "reference_loss", "reason", "time",
    }  # fmt: skip
    assert "incident" in first["reason"]
    assert result.stats["quarantined_samples"] == len(result.named)
    assert torch.isfinite(torch.tensor(result.losses)).all()
