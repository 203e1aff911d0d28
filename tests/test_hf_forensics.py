"""Forensics in a real ``transformers.Trainer``: tiny GPT-2 and LLaMA on CPU, no download.

After a rollback the callback re-evaluates the suspect micro-batches (kept from its
``get_batch_samples`` tap) forward only from the restored state, with the per-sample
loss derived from the model's head, and the verdict decides the next step: random-token
examples are ``data`` (named by dataset index, quarantined), a 30x learning-rate jump
is ``state`` (the LR is cut at that first rollback). The dataset indices come from a
recorder on the Trainer's own train dataloader, which must not change the data order.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hf_forensics_scenario import Arch, Forensic, Rollbacks, guard, precision_recall, train_run
from spikewatch.errors import ConfigError
from spikewatch.records import Decision, Signal
from spikewatch_hooks.adapters.hf import SpikewatchCallback
from spikewatch_hooks.adapters.hf.probe_loss import causal_lm_loss, derived_probe_loss, head_of
from spikewatch_hooks.demo.corpus import CharCorpus, corpus_text

log = logging.getLogger(__name__)
S = Forensic()
# The short runs keep the 300-step run's rollback settings: no rollback is expected there.
pytestmark = pytest.mark.filterwarnings("ignore::spikewatch_hooks.core.run_length.RunLengthWarning")


@pytest.fixture(scope="module")
def corpus(one_torch_thread: None) -> CharCorpus:
    return CharCorpus(corpus_text(200_000))


#: ``data_runs(arch)``: the stats, rollbacks and quarantine file of that run.
DataRuns = Callable[[Arch], dict[str, Any]]


@pytest.fixture(scope="module")
def data_runs(corpus: CharCorpus, tmp_path_factory: pytest.TempPathFactory) -> DataRuns:
    """The random-token run of each architecture, with forensics (trained once)."""
    done: dict[str, dict[str, Any]] = {}

    def run(arch: Arch) -> dict[str, Any]:
        if arch not in done:
            folder = tmp_path_factory.mktemp(f"data-{arch}")
            callback = guard(S, quarantine_file=folder / "quarantine.jsonl")
            rollbacks = Rollbacks(callback)
            train_run(corpus, folder, S, trouble="data", arch=arch,
                      callbacks=[callback, rollbacks])  # fmt: skip
            done[arch] = {"stats": callback.stats, "rollbacks": rollbacks.seen,
                          "quarantine": folder / "quarantine.jsonl"}  # fmt: skip
        return done[arch]

    return run


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_random_token_examples_are_blamed_on_the_data_and_named(
    data_runs: DataRuns, arch: Arch
) -> None:
    run = data_runs(arch)
    stats = run["stats"]
    verdict = stats["last_verdict"]
    assert run["rollbacks"] == [{"cause": "data", "lr_scale": 1.0, "step": 220}]
    assert (stats["rollbacks"], stats["halted"], verdict["cause"]) == (1, False, "data")
    poisoned = set(S.poisoned) & S.samples_at(verdict["suspect_positions"])
    named = {s["index"] for s in verdict["samples"]}
    precision, recall = precision_recall(named, poisoned)
    log.info("%s: %d suspect batches, %d poisoned samples in them, %d named: P %.3f R %.3f",
             arch, len(verdict["suspect_positions"]), len(poisoned), len(named), precision,
             recall)  # fmt: skip
    assert len(poisoned) >= 100  # the probe reached well into the bad range
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    # The named samples are in the quarantine file (one line each), by dataset index.
    lines = [json.loads(line) for line in run["quarantine"].read_text().splitlines()]
    assert {e["index"] for e in lines} == named == set(range(min(named), max(named) + 1))
    assert stats["quarantined_samples"] == len(named)
    assert stats["probe_forward_passes"] == len(verdict["suspect_positions"]) + 8


def test_without_forensics_the_data_run_rolls_back_alike(
    corpus: CharCorpus, tmp_path: Path, data_runs: DataRuns
) -> None:
    callback = guard(S, forensics=False)
    train_run(corpus, tmp_path, S, trouble="data", callbacks=[callback])
    stats = callback.stats
    assert callback.engine.forensics is None and stats["last_verdict"] is None
    assert "probe_forward_passes" not in stats
    assert stats["rollbacks"] == data_runs("gpt2")["stats"]["rollbacks"] == 1
    assert stats["skip_ledger"] == data_runs("gpt2")["stats"]["skip_ledger"]


def test_a_learning_rate_jump_is_blamed_on_the_state_and_cut_at_once(
    corpus: CharCorpus, tmp_path: Path
) -> None:
    """LLaMA at 30x the LR from step 200 (the tiny GPT-2 rides a jump like that out)."""
    outcomes = {}
    for forensics in (True, False):
        callback = guard(S, forensics=forensics)
        rollbacks = Rollbacks(callback)
        train_run(corpus, tmp_path / str(forensics), S, trouble="lr", arch="llama",
                  callbacks=[callback, rollbacks])  # fmt: skip
        outcomes[forensics] = (callback.stats, rollbacks.seen)
    (probed, seen), (plain, plain_seen) = outcomes[True], outcomes[False]
    log.info("LR jump: %d rollbacks with forensics %s, %d without %s",
             probed["rollbacks"], seen, plain["rollbacks"], plain_seen)  # fmt: skip
    assert seen[0]["cause"] == "state" and seen[0]["lr_scale"] == 0.5  # cut at the first
    assert probed["last_verdict"]["action"] == "lr x0.5 now"
    assert plain_seen[0] == {"cause": None, "lr_scale": 1.0, "step": seen[0]["step"]}
    assert probed["rollbacks"] < plain["rollbacks"]
    assert not probed["halted"] and probed.get("quarantined_samples", 0) == 0


class IndexCheck(TrainerCallback):
    """After every step: each batch in the probe's cache holds the samples its recorded
    dataset indices say (the ``sample`` column, which the model never sees)."""

    def __init__(self, watch: SpikewatchCallback) -> None:
        self.watch, self.checked, self.wrong = watch, 0, 0
        self._seen: set[int] = set()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        forensics = self.watch.engine.forensics
        assert forensics is not None
        for entry in forensics.cache.entries():
            if entry.position in self._seen:
                continue
            self._seen.add(entry.position)
            self.checked += 1
            self.wrong += entry.indices != tuple(entry.batch["sample"].tolist())


def test_indices_follow_the_seeded_sampler_across_epochs_and_a_resume(
    corpus: CharCorpus, tmp_path: Path
) -> None:
    """The Trainer's seeded random sampler, 4 micro-batches a step, an epoch of 9 steps;
    a checkpoint at step 13 is resumed mid-epoch (accelerate's skip_first_batches)."""
    s = replace(S, steps=30, batch_size=4, accumulation=4, examples=9 * 16, sampling="random")
    first = guard(s)
    check = IndexCheck(first)
    train_run(corpus, tmp_path, s, trouble="none", callbacks=[first, check],
              save_strategy="steps", save_steps=13)  # fmt: skip
    assert (check.checked, check.wrong) == (30 * 4, 0)
    resumed = guard(s)
    check = IndexCheck(resumed)
    train_run(corpus, tmp_path, s, trouble="none", callbacks=[resumed, check],
              resume_from_checkpoint=str(tmp_path / "checkpoint-13"))  # fmt: skip
    assert (check.checked, check.wrong) == ((30 - 13) * 4, 0)


def test_forensics_leaves_the_data_order_and_the_weights_as_they_were(
    corpus: CharCorpus, tmp_path: Path
) -> None:
    """A healthy run with the Trainer's seeded random sampler: the same weights, bit for
    bit, with the index recorder and batch cache as without them."""
    s = replace(S, steps=120, sampling="random")
    weights = []
    for forensics in (True, False):
        callback = guard(s, forensics=forensics)
        model, _ = train_run(corpus, tmp_path / str(forensics), s, trouble="none",
                             callbacks=[callback])  # fmt: skip
        assert (callback.stats["rollbacks"], callback.stats["skipped_steps"]) == (0, 0)
        weights.append([p.detach().clone() for p in model.parameters()])
        if forensics:
            assert callback.stats["probe_cache_batches"] == 64
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_a_quarantine_file_drops_its_samples_from_a_later_run(
    corpus: CharCorpus, tmp_path: Path, data_runs: DataRuns
) -> None:
    """The named samples of the data run are dropped row by row from a new run of the
    same data: the first bad batch keeps its 5 clean rows, the 15 all-bad ones go."""
    run = data_runs("gpt2")
    named = {s["index"] for s in run["stats"]["last_verdict"]["samples"]}
    s = replace(S, steps=260)
    quarantine = tmp_path / "quarantine.jsonl"
    shutil.copy(run["quarantine"], quarantine)  # the module's run keeps its own
    callback = guard(s, quarantine_file=quarantine)
    train_run(corpus, tmp_path, s, trouble="data", callbacks=[callback])
    stats = callback.stats
    assert stats["quarantined_samples_skipped"] == len(named) == 16 * 16 - S.poison_offset
    assert stats["quarantined_batches_skipped"] == 15
    assert callback.engine.forensics is not None
    assert callback.engine.forensics.quarantined == named


def test_an_unknown_head_makes_the_verdict_say_to_pass_probe_loss(
    corpus: CharCorpus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A token-classification head: no per-sample loss is derived (a warning at train
    start); a probe from the state the run ended in is ``unknown`` and says what to do."""
    config = GPT2Config(vocab_size=corpus.vocab_size, n_positions=S.context, n_embd=16,
                        n_layer=1, n_head=1, bos_token_id=None, eos_token_id=None)  # fmt: skip
    config.num_labels = corpus.vocab_size  # a label per token: any token id
    s = replace(S, steps=12)
    callback = guard(s)
    with caplog.at_level(logging.WARNING, logger="spikewatch_hooks"):
        train_run(corpus, tmp_path, s, trouble="none", callbacks=[callback],
                  model=GPT2ForTokenClassification(config))  # fmt: skip
    assert "no per-sample loss can be derived for GPT2ForTokenClassification" in caplog.text
    engine = callback.engine
    assert engine.forensics is not None and len(engine.forensics.cache) == 12
    signal = Signal(run="r", kind="level_shift", metric="loss", step=11, value=9.0, score=9.0,
                    baseline=3.0, onset_step=8, peak_step=11, incident="r:1")  # fmt: skip
    decision = Decision(run="r", step=11, action="rollback", reason="test", signal=signal)
    verdict = engine.forensics.probe(engine, decision, restored_step=0)
    assert verdict.cause == "unknown"
    assert "GPT2ForTokenClassification" in verdict.why and "pass probe_loss=" in verdict.why
    assert engine.stats["probe_failures"] == 1


def _tiny_config(**extra: Any) -> GPT2Config:
    return GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=13, n_positions=8,
                      bos_token_id=None, eos_token_id=None, **extra)  # fmt: skip


def test_the_derived_causal_lm_loss_is_transformers_loss_per_sample(one_torch_thread: None) -> None:
    """Per sample, with padding labels (-100): weighted by each sample's counted tokens,
    the per-sample means give back the model's own (token-mean) loss."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(_tiny_config())
    model.train(False)
    ids = torch.randint(0, 13, (4, 8))
    labels = ids.clone()
    labels[1, 5:] = -100
    labels[2, :] = -100  # nothing to predict: counts 0
    with torch.no_grad():
        per_sample = causal_lm_loss(model, {"input_ids": ids, "labels": labels})
        own = model(input_ids=ids, labels=labels).loss
    counted = (labels[:, 1:] != -100).sum(dim=1)
    assert counted.tolist() == [7, 4, 0, 7] and float(per_sample[2]) == 0.0
    assert torch.allclose((per_sample * counted).sum() / counted.sum(), own)
    alone = model(input_ids=ids[1:2], labels=labels[1:2]).loss
    assert torch.allclose(per_sample[1], alone)


@pytest.mark.parametrize(
    ("num_labels", "labels"),
    [
        (3, torch.tensor([0, 2, 1, 2])),  # single-label: integer classes
        (1, torch.tensor([0.5, -1.0, 2.0, 0.0])),  # regression
        (3, torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])),  # multi-label
    ],
)
def test_the_derived_classification_loss_is_transformers_loss_per_sample(
    one_torch_thread: None, num_labels: int, labels: torch.Tensor
) -> None:
    torch.manual_seed(0)
    config = _tiny_config(num_labels=num_labels, pad_token_id=0)
    model = GPT2ForSequenceClassification(config)
    model.train(False)
    ids = torch.randint(1, 13, (4, 6))
    assert head_of(model) == "sequence_classification"
    with torch.no_grad():
        per_sample = derived_probe_loss(model)(model, {"input_ids": ids, "labels": labels})
        own = model(input_ids=ids, labels=labels).loss
    assert per_sample.shape == (4,)
    assert torch.allclose(per_sample.mean(), own, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"probe_cache_batches": 0}, "probe_cache_batches=0"),
        ({"probe_cache_bytes": 1.5}, "probe_cache_bytes=1.5"),
        ({"probe_loss": "per_sample"}, "probe_loss='per_sample'"),
        ({"forensics": "yes"}, "forensics='yes'"),
    ],
)
def test_bad_forensics_options_fail_at_construction(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SpikewatchCallback(**options)
