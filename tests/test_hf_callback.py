"""`SpikewatchCallback` in a real ``transformers.Trainer``: tiny GPT-2, CPU, no downloads.

The training data is character windows of the demo corpus, read in order
(``train_sampling_strategy="sequential"``), so batch ``p`` of every run holds the same
examples and a poisoned range sits at the same data positions in every run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from service_process import TOKEN, ServiceProcess
from spikewatch.errors import ConfigError
from spikewatch.http_transport import HttpTransport
from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.adapters.hf import SpikewatchCallback
from spikewatch_hooks.demo.corpus import CharCorpus, corpus_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scenario:
    """Sizes of one run; the poisoned batches sit ~80 % of the way through."""

    steps: int = 300
    poison_start: int = 240
    poison_batches: int = 40
    spare_batches: int = 150  # data beyond max_steps, for the batches a rollback skips
    batch_size: int = 16
    context: int = 32
    lr: float = 6e-3
    warmup: int = 20
    eval_batches: int = 8


class Windows(Dataset[dict[str, torch.Tensor]]):
    """Item ``i``: a seeded window of the text; items of poisoned batches get shifted labels."""

    def __init__(self, tokens: torch.Tensor, vocab: int, s: Scenario, *, poison: bool) -> None:
        g = torch.Generator().manual_seed(1)
        n = (s.steps + s.spare_batches) * s.batch_size
        limit = int(len(tokens) * 0.9) - s.context
        self.starts = torch.randint(0, limit, (n,), generator=g)
        self.tokens, self.vocab, self.context = tokens, vocab, s.context
        lo, hi = s.poison_start * s.batch_size, (s.poison_start + s.poison_batches) * s.batch_size
        self.poisoned = range(lo, hi) if poison else range(0)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = int(self.starts[i])
        x = self.tokens[start : start + self.context]
        labels = (x + 7) % self.vocab if i in self.poisoned else x
        return {"input_ids": x, "labels": labels}


@pytest.fixture(scope="module")
def corpus() -> Iterator[CharCorpus]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield CharCorpus(corpus_text(200_000))
    torch.set_num_threads(threads)


def tiny_gpt(vocab: int, context: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=context,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def train(
    corpus: CharCorpus,
    tmp_path: Path,
    s: Scenario,
    *,
    poison: bool,
    callback: SpikewatchCallback | None = None,
    model: GPT2LMHeadModel | None = None,
    **overrides: Any,
) -> tuple[GPT2LMHeadModel, Trainer]:
    """Train one run with a real Trainer; return the model and the trainer."""
    model = model or tiny_gpt(corpus.vocab_size, s.context)
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "max_steps": s.steps,
        "per_device_train_batch_size": s.batch_size,
        "learning_rate": s.lr,
        "weight_decay": 0.1,
        "lr_scheduler_type": "cosine",
        "warmup_steps": s.warmup,
        "dataloader_num_workers": 0,
        "train_sampling_strategy": "sequential",
        "seed": 0,
        "disable_tqdm": True,
    }
    args = TrainingArguments(**{**settings, **overrides})
    data = Windows(corpus.tokens, corpus.vocab_size, s, poison=poison)
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=[] if callback is None else [callback]
    )
    trainer.train()
    return model, trainer


def held_out_loss(model: GPT2LMHeadModel, corpus: CharCorpus, s: Scenario) -> float:
    """Mean loss on fixed, clean windows of the last 10 % of the text."""
    g = torch.Generator().manual_seed(2)
    low, high = int(len(corpus.tokens) * 0.9), len(corpus.tokens) - s.context
    starts = torch.randint(low, high, (s.eval_batches * s.batch_size,), generator=g)
    x = torch.stack([corpus.tokens[int(a) : int(a) + s.context] for a in starts])
    model.train(False)
    with torch.no_grad():
        losses = [float(model(input_ids=b, labels=b).loss) for b in torch.split(x, s.batch_size)]
    return sum(losses) / len(losses)


def guard_for(s: Scenario) -> SpikewatchCallback:
    policy = PolicyConfig(margin=20, skip_ahead=s.poison_batches)
    return SpikewatchCallback(
        run_id="hf-test",
        config=MonitorConfig(policy=policy),
        snapshot_every=10,
        keep_snapshots=8,
    )


SCENARIO = Scenario()


@pytest.fixture(scope="module")
def clean_run(corpus: CharCorpus, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A healthy run with the callback: the false-alarm check, and the clean reference
    (a callback that takes no action leaves training bit-identical to a run without it)."""
    callback = guard_for(SCENARIO)
    model, trainer = train(
        corpus, tmp_path_factory.mktemp("clean"), SCENARIO, poison=False, callback=callback
    )
    return {
        "loss": held_out_loss(model, corpus, SCENARIO),
        "stats": callback.stats,
        "trainer": trainer,
    }


def test_poisoned_run_recovers_with_the_callback(
    corpus: CharCorpus, tmp_path: Path, clean_run: dict[str, Any]
) -> None:
    s = SCENARIO
    model, _ = train(corpus, tmp_path / "unguarded", s, poison=True)
    unguarded = held_out_loss(model, corpus, s)
    callback = guard_for(s)
    model, trainer = train(corpus, tmp_path / "guarded", s, poison=True, callback=callback)
    guarded = held_out_loss(model, corpus, s)
    clean = clean_run["loss"]
    log.info("held-out loss: clean %.4f unguarded %.4f guarded %.4f", clean, unguarded, guarded)
    stats = callback.stats
    assert unguarded >= 1.2 * clean, (clean, unguarded)
    assert guarded <= 1.05 * clean, (clean, guarded, stats)
    assert stats["rollbacks"] >= 1
    assert not stats["halted"]
    poisoned = range(s.poison_start, s.poison_start + s.poison_batches)
    assert all(p in callback.engine.ledger for p in poisoned), stats["skip_ledger"]
    # The surviving branch took the full number of updates; the schedule ran to its end.
    assert callback.engine.step_count == callback.engine.scheduler.last_epoch == s.steps
    assert trainer.state.global_step == s.steps + stats["skipped_batches"]


def test_healthy_run_takes_no_action(clean_run: dict[str, Any]) -> None:
    stats = clean_run["stats"]
    assert (stats["rollbacks"], stats["halted"], stats["skipped_steps"]) == (0, False, 0)
    assert clean_run["trainer"].state.global_step == SCENARIO.steps


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


def test_extreme_grad_norm_is_known_one_step_late(corpus: CharCorpus, tmp_path: Path) -> None:
    s = Scenario(steps=80, poison_batches=0, spare_batches=10)
    callback = guard_for(s)
    model = tiny_gpt(corpus.vocab_size, s.context)
    scaled_loss_once(model, call=65, factor=1e4)  # after the detectors' 50-step warm-up
    train(corpus, tmp_path, s, poison=False, callback=callback, model=model)
    stats = callback.stats
    assert (stats["late_skips"], stats["skipped_steps"], stats["rollbacks"]) == (1, 0, 0)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_halt_stops_training_and_says_why(
    corpus: CharCorpus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = SCENARIO
    callback = SpikewatchCallback(
        config=MonitorConfig(policy=PolicyConfig(margin=20, max_rollbacks=0)), snapshot_every=10
    )
    with caplog.at_level(logging.ERROR, logger="spikewatch_hooks"):
        _, trainer = train(corpus, tmp_path, s, poison=True, callback=callback)
    stats = callback.stats
    assert stats["halted"] and "rollback budget is spent" in stats["halt_reason"]
    assert s.poison_start < trainer.state.global_step < s.steps
    assert stats["halt_reason"] in caplog.text


def test_logging_steps_other_than_one_is_a_clear_error(corpus: CharCorpus, tmp_path: Path) -> None:
    s = Scenario(steps=2, poison_batches=0, spare_batches=0)
    with pytest.raises(ConfigError, match=r"set logging_steps=1"):
        train(corpus, tmp_path, s, poison=False, callback=SpikewatchCallback(), logging_steps=5)


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
    corpus: CharCorpus, tmp_path: Path, clean_run: dict[str, Any]
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
        model, _ = train(corpus, tmp_path / "guarded", s, poison=True, callback=callback)
        _, run = svc.get("/v1/runs/hf-service")
    assert callback.stats["rollbacks"] >= 1
    assert held_out_loss(model, corpus, s) <= 1.05 * clean_run["loss"]
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
