"""`SpikewatchCallback` in a real ``transformers.Trainer``: tiny GPT-2, CPU, no downloads.

The runs (`hf_scenario`) read the data in order, so a poisoned range sits at the same
optimizer steps in every run. The Trainer logs every 50 steps (the callback gets every
step's values from the Trainer itself), once without and once with gradient
accumulation of 4 (a step is then 4 data positions).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
from transformers import GPT2LMHeadModel, TrainerControl, TrainerState

from hf_scenario import (
    SCENARIO,
    Scenario,
    guard_for,
    held_out_loss,
    tiny_gpt,
    train,
    trainer_args,
)
from service_process import TOKEN, ServiceProcess
from spikewatch.errors import ConfigError, SpikewatchError
from spikewatch.http_transport import HttpTransport
from spikewatch.monitor import Monitor
from spikewatch.policy import PolicyConfig
from spikewatch.records import StepRecord
from spikewatch.settings import MonitorConfig
from spikewatch.transport import EmbeddedTransport
from spikewatch_hooks.adapters.hf import SpikewatchCallback
from spikewatch_hooks.core.run_length import RunLengthWarning
from spikewatch_hooks.demo.corpus import CharCorpus, corpus_text

log = logging.getLogger(__name__)

#: The two ways teams configure the Trainer that the issue names (logging every 50 steps).
CONFIGS = {
    "logging_steps=50": SCENARIO,
    "gradient_accumulation_steps=4": replace(SCENARIO, accumulation=4),
}


@pytest.fixture(scope="module")
def corpus() -> Iterator[CharCorpus]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield CharCorpus(corpus_text(200_000))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean_runs(
    corpus: CharCorpus, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Scenario], dict[str, Any]]:
    """The healthy twin of a scenario (trained once per module): clean data with the
    callback (the false-alarm check), and the clean reference (a callback that takes
    no action leaves training as it was)."""
    done: dict[Scenario, dict[str, Any]] = {}

    def clean_run(s: Scenario) -> dict[str, Any]:
        if s not in done:
            callback = guard_for(s)
            model, trainer, positions = train(
                corpus, tmp_path_factory.mktemp("clean"), s, poison=False, callback=callback
            )
            done[s] = {
                "loss": held_out_loss(model, corpus, s),
                "stats": callback.stats,
                "trainer": trainer,
                "positions": positions.positions,
            }
        return done[s]

    return clean_run


@pytest.mark.parametrize("config", list(CONFIGS))
def test_poisoned_run_recovers_with_the_callback(
    corpus: CharCorpus, tmp_path: Path, clean_runs: Callable[[Scenario], Any], config: str
) -> None:
    s = CONFIGS[config]
    model, _, _ = train(corpus, tmp_path / "unguarded", s, poison=True)
    unguarded = held_out_loss(model, corpus, s)
    callback = guard_for(s)
    model, trainer, computed = train(
        corpus, tmp_path / "guarded", s, poison=True, callback=callback
    )
    guarded = held_out_loss(model, corpus, s)
    clean = clean_runs(s)["loss"]
    log.info("held-out loss: clean %.4f unguarded %.4f guarded %.4f", clean, unguarded, guarded)
    stats, ledger = callback.stats, callback.engine.ledger
    assert unguarded >= 1.2 * clean, (clean, unguarded)
    assert guarded <= 1.05 * clean, (clean, guarded, stats)
    assert stats["rollbacks"] >= 1
    assert not stats["halted"]
    assert all(p in ledger for p in s.poisoned_positions), stats["skip_ledger"]
    # skip_ahead counts optimizer steps: a step's worth of positions each.
    assert len(ledger) >= s.poison_batches * s.accumulation
    # The surviving branch took the full number of updates; the schedule ran to its end.
    assert callback.engine.step_count == callback.engine.scheduler.last_epoch == s.steps
    # The data only goes forward, each batch computed at most once. The ledger batches
    # computed are the ones consumed before the rollback put them there; every ledger
    # batch still ahead then was dropped before its forward.
    positions = computed.positions
    assert positions == sorted(set(positions))
    assert len(positions) == trainer.state.global_step * s.accumulation
    seen = set(positions)
    wasted = [p for p in positions if p in ledger]
    passed_over = [p for p in range(max(positions)) if p in ledger and p not in seen]
    assert len(passed_over) >= s.poison_batches * s.accumulation  # skip_ahead, in steps
    assert max(wasted) < min(passed_over)
    assert stats["skipped_batches"] == len(wasted) + len(passed_over)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_healthy_run_takes_no_action(clean_runs: Callable[[Scenario], Any], config: str) -> None:
    s = CONFIGS[config]
    clean_run = clean_runs(s)
    stats = clean_run["stats"]
    assert (stats["rollbacks"], stats["halted"]) == (0, False)
    # Once in a full-suite run (not reproduced alone, at 1 or 2 threads) the accumulation
    # run skipped one update: this chaotic toy (lr 6e-3) can throw a real grad-norm
    # outlier. One skipped update leaves training as it was; a second would be a pattern.
    assert stats["skipped_steps"] <= 1, stats
    assert clean_run["trainer"].state.global_step == s.steps
    assert clean_run["positions"] == list(range(s.steps * s.accumulation))


class RecordingTransport(EmbeddedTransport):
    """The embedded monitor, keeping every record it is handed."""

    def __init__(self, monitor: Monitor) -> None:
        super().__init__(monitor)
        self.records: list[StepRecord] = []

    def submit(self, records: Any) -> Any:
        self.records.extend(records)
        return super().submit(records)


@pytest.mark.parametrize("accumulation", [1, 4])
def test_every_step_reaches_the_monitor_unrounded(
    corpus: CharCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accumulation: int
) -> None:
    """At the Trainer's default logging_steps=500, every step's own loss (the mean over
    its micro-batches' tokens, unrounded) and pre-clip grad norm reach the monitor."""
    s = Scenario(steps=40, poison_batches=0, spare_batches=0, accumulation=accumulation)
    transport = RecordingTransport(Monitor(run="hf-values"))
    callback = SpikewatchCallback(run_id="hf-values", transport=transport)
    model = tiny_gpt(corpus.vocab_size, s.context)
    losses: list[float] = []
    model.register_forward_hook(
        lambda m, i, out: losses.append(float(out.loss.detach())) if m.training else None
    )
    norms: list[float] = []  # the pre-clip norm, as accelerate clips with it
    clip = torch.nn.utils.clip_grads_with_norm_

    def recording_clip(params: Any, max_norm: float, total_norm: torch.Tensor, *a: Any) -> None:
        norms.append(float(total_norm))
        clip(params, max_norm, total_norm, *a)

    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", recording_clip)
    train(corpus, tmp_path, s, poison=False, callback=callback, model=model,
          logging_steps=500, max_grad_norm=0.5)  # fmt: skip
    records = transport.records
    assert [r.step for r in records] == list(range(s.steps))
    # The Trainer has the model divide each micro-batch's token losses by the step's
    # token count (num_items_in_batch): the step's mean loss is their sum.
    step_losses = torch.tensor(losses).reshape(s.steps, accumulation).sum(dim=1)
    assert float(step_losses[0]) == pytest.approx(math.log(corpus.vocab_size), rel=0.05)
    assert [r.loss for r in records] == pytest.approx(step_losses.tolist(), rel=1e-6)
    assert any(round(r.loss, 4) != r.loss for r in records)  # not the logs' 4 decimals
    assert [r.grad_norm for r in records] == pytest.approx(norms, rel=1e-6)
    assert max(norms) > 0.5  # some steps were clipped: the monitor saw the pre-clip norm
    assert [r.data_position for r in records] == [
        (k + 1) * accumulation - 1 for k in range(s.steps)
    ]


def scaled_loss_once(model: GPT2LMHeadModel, call: int, factor: float) -> None:
    """Multiply the training loss of the ``call``-th forward pass by ``factor``."""
    calls = 0

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call and module.training:
            output.loss = output.loss * factor
        return output

    model.register_forward_hook(hook)


def test_nonfinite_loss_skips_the_update_in_time(corpus: CharCorpus, tmp_path: Path) -> None:
    s = Scenario(steps=60, poison_batches=0, spare_batches=10)
    callback = guard_for(s)
    model = tiny_gpt(corpus.vocab_size, s.context)
    scaled_loss_once(model, call=30, factor=math.nan)
    train(corpus, tmp_path, s, poison=False, callback=callback, model=model)
    stats = callback.stats
    assert (stats["skipped_steps"], stats["rollbacks"], stats["halted"]) == (1, 0, False)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert callback.engine.step_count == s.steps  # a skipped update still counts as a step


def test_extreme_grad_norm_skips_the_update_in_time(corpus: CharCorpus, tmp_path: Path) -> None:
    s = Scenario(steps=80, poison_batches=0, spare_batches=10)
    callback = guard_for(s)
    model = tiny_gpt(corpus.vocab_size, s.context)
    scaled_loss_once(model, call=65, factor=1e4)  # after the detectors' 50-step warm-up
    train(corpus, tmp_path, s, poison=False, callback=callback, model=model)
    stats = callback.stats
    # The Trainer's pre-clip norm reaches the guard before optimizer.step(): no late skip.
    assert (stats.get("late_skips", 0), stats["skipped_steps"], stats["rollbacks"]) == (0, 1, 0)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_halt_stops_training_and_says_why(
    corpus: CharCorpus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = SCENARIO
    callback = SpikewatchCallback(
        config=MonitorConfig(policy=PolicyConfig(margin=20, max_rollbacks=0)), snapshot_every=10
    )
    with caplog.at_level(logging.ERROR, logger="spikewatch_hooks"):
        _, trainer, _ = train(corpus, tmp_path, s, poison=True, callback=callback)
    stats = callback.stats
    assert stats["halted"] and "rollback budget is spent" in stats["halt_reason"]
    assert s.poison_start < trainer.state.global_step < s.steps
    assert stats["halt_reason"] in caplog.text


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"snapshot_every": 0}, "snapshot_every"),
        ({"keep_snapshots": 1.5}, "keep_snapshots"),
        ({"margin": -1}, "margin"),
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SpikewatchCallback(**options)


def test_stats_before_training_say_what_to_do() -> None:
    with pytest.raises(Exception, match=r"trainer\.train\(\)"):
        _ = SpikewatchCallback().stats


def test_poisoned_run_recovers_through_the_monitor_service(
    corpus: CharCorpus, tmp_path: Path, clean_runs: Callable[[Scenario], Any]
) -> None:
    s = SCENARIO
    policy = f"[monitor.policy]\nmargin = 20\nskip_ahead = {s.poison_batches}\n"
    with ServiceProcess(tmp_path, config=policy) as svc:
        transport = HttpTransport(
            svc.url, run="hf-service", token=TOKEN, batch_size=8, flush_interval_s=0.01
        )
        callback = SpikewatchCallback(
            run_id="hf-service", snapshot_every=10, keep_snapshots=8, transport=transport
        )
        model, _, _ = train(corpus, tmp_path / "guarded", s, poison=True, callback=callback)
        _, run = svc.get("/v1/runs/hf-service")
    assert callback.stats["rollbacks"] >= 1
    assert held_out_loss(model, corpus, s) <= 1.05 * clean_runs(s)["loss"]
    assert run["rollbacks"] >= 1 and run["skipped_batches"] > 0
    assert run["state"] == "finished"  # the callback said so at the end of training
    assert run["records"] >= s.steps


TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to python")
def test_multi_process_trainer_reports_once_to_the_service(tmp_path: Path) -> None:
    with ServiceProcess(tmp_path) as svc:
        done = subprocess.run(
            [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "tests/hf_ddp_worker.py",
             str(tmp_path), svc.url],
            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "SPIKEWATCH_TOKEN": TOKEN},
            check=False,
        )  # fmt: skip
        _, run = svc.get("/v1/runs/hf-ddp")
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["rollbacks"] >= 1 and r0["identical"] and r0["lockstep"]
    assert run["decides"] == "trainer" and run["state"] == "finished"
    assert run["rollbacks"] == r0["rollbacks"]  # one client (rank 0), counted once
    assert run["last_step"] == r0["step_count"] - 1


def test_a_callback_outside_a_trainer_says_how_to_attach(
    corpus: CharCorpus, tmp_path: Path
) -> None:
    model = tiny_gpt(corpus.vocab_size, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    args = trainer_args(tmp_path, Scenario(steps=2))
    with pytest.raises(SpikewatchError, match=r"callback\.attach\(trainer\)"):
        SpikewatchCallback().on_train_begin(
            args, TrainerState(), TrainerControl(), model=model, optimizer=optimizer
        )


def test_defaults_fit_a_short_run(
    corpus: CharCorpus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Scenario(steps=60, poison_batches=0, spare_batches=10)
    callback = SpikewatchCallback(run_id="short")  # every rollback setting at its default
    with caplog.at_level(logging.WARNING, logger="spikewatch_hooks"):
        train(corpus, tmp_path, s, poison=False, callback=callback)
    policy = callback.options.config.policy
    # One rollback undoes at most ~10 % of the 60-step run (not 100 + 100 steps of it).
    assert (policy.margin, policy.skip_ahead, callback.options.snapshot_every) == (3, 6, 2)
    assert "a 60-step run: margin 3, skip_ahead 6, snapshot_every 2" in caplog.text
    assert callback.engine.snapshot_every == 2


def test_explicit_settings_out_of_proportion_warn_at_train_start(
    corpus: CharCorpus, tmp_path: Path
) -> None:
    s = Scenario(steps=60, poison_batches=0, spare_batches=10)
    callback = SpikewatchCallback(run_id="short", margin=100, snapshot_every=100)
    with pytest.warns(RunLengthWarning, match="margin=100 with snapshot_every=100 can roll back"):
        train(corpus, tmp_path, s, poison=False, callback=callback)
    assert callback.options.config.policy.margin == 100  # kept: the user chose it
