"""SpikewatchCallback in a real Lightning Trainer: real training of a small MLP on CPU.

The task: 10-way classification of Gaussian inputs whose labels a fixed random teacher
samples (so the loss has a floor). The i-th training batch is data position i (no
shuffling); the poisoned run has its labels shifted for a range of positions 80 % of the
way through, as a corrupted shard would.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from spikewatch.errors import ConfigError
from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.adapters.lightning import SpikewatchCallback

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]

FEATURES, HIDDEN, CLASSES, BATCH = 32, 64, 10, 256
STEPS = 400
POISON_START, POISON_BATCHES = 320, 40  # positions [320, 360): 80 % of the way through
DATA_BATCHES = STEPS + 200  # headroom for the batches a rollback passes over
PEAK_LR, WARMUP, LR_FLOOR = 3e-2, 20, 0.1


@pytest.fixture(autouse=True, scope="module")
def _torch_settings() -> Iterator[None]:
    # One thread: these matrices are tiny, and on a busy 2-core host two OpenMP threads
    # made each step ~10x slower. deterministic=True flips a global flag: put it back.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def make_data(
    batches: int, *, seed: int = 2, poison: range = range(0), nan_at: int | None = None
) -> TensorDataset:
    """Seeded samples; labels drawn from a fixed teacher; poison given by batch position."""
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * BATCH, FEATURES, generator=g)
    probs = torch.softmax(x @ teacher * (8 / math.sqrt(FEATURES)), dim=1)
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)
    bad = slice(poison.start * BATCH, poison.stop * BATCH)
    y[bad] = (y[bad] + 3) % CLASSES  # the labels no longer match the inputs
    if nan_at is not None:
        x[nan_at * BATCH : (nan_at + 1) * BATCH] = math.nan
    return TensorDataset(x, y)


class Classifier(pl.LightningModule):
    """An MLP; AdamW with warm-up and cosine decay to a floor, stepped every step."""

    def __init__(self, *, steps: int = STEPS) -> None:
        super().__init__()
        self.steps = steps
        self.net = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, CLASSES))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=PEAK_LR, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(step, self.steps) / self.steps))
        return min(1.0, (step + 1) / WARMUP) * (LR_FLOOR + (1.0 - LR_FLOOR) * cosine)


class ManualClassifier(Classifier):
    """Manual optimization: not supported by the callback."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class TwoSchedulers(Classifier):
    """Two lr schedulers: not supported by the callback."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=PEAK_LR)
        warm = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return [opt], [warm, torch.optim.lr_scheduler.StepLR(opt, step_size=100)]


def make_trainer(
    callback: SpikewatchCallback | None, *, max_steps: int = STEPS, **extra: Any
) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        deterministic=True,
        callbacks=[] if callback is None else [callback],
        **extra,
    )


def guard_callback(monitor_url: str | None = None, token: str | None = None) -> SpikewatchCallback:
    """The policy sized to this short run (a real run keeps the 100-step defaults);
    ``monitor_url``/``token``: a `spikewatch serve` to report to."""
    config = MonitorConfig(policy=PolicyConfig(margin=20, skip_ahead=POISON_BATCHES))
    return SpikewatchCallback(
        run_id="mlp", config=config, snapshot_every=10, keep_snapshots=8,
        monitor_url=monitor_url, token=token,
    )  # fmt: skip


def held_out_loss(model: Classifier) -> float:
    """Mean loss on fixed clean data the run never saw."""
    x, y = make_data(32, seed=99).tensors
    with torch.no_grad():
        return functional.cross_entropy(model.net(x), y).item()


def fit(
    data: TensorDataset, callback: SpikewatchCallback | None = None, *, max_steps: int = STEPS
) -> tuple[Classifier, pl.Trainer]:
    torch.manual_seed(0)
    model = Classifier()
    trainer = make_trainer(callback, max_steps=max_steps)
    trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=False))
    return model, trainer


@pytest.fixture(scope="module")
def clean_loss() -> float:
    model, _ = fit(make_data(DATA_BATCHES))
    return held_out_loss(model)


@pytest.fixture(scope="module")
def guarded_run() -> tuple[Classifier, pl.Trainer, SpikewatchCallback]:
    callback = guard_callback()
    poison = range(POISON_START, POISON_START + POISON_BATCHES)
    model, trainer = fit(make_data(DATA_BATCHES, poison=poison), callback)
    return model, trainer, callback


def test_poisoned_run_recovers_only_with_the_callback(
    clean_loss: float, guarded_run: tuple[Classifier, pl.Trainer, SpikewatchCallback]
) -> None:
    poison = range(POISON_START, POISON_START + POISON_BATCHES)
    unguarded, _ = fit(make_data(DATA_BATCHES, poison=poison))
    model, trainer, callback = guarded_run
    assert held_out_loss(unguarded) >= 1.20 * clean_loss
    assert abs(held_out_loss(model) - clean_loss) <= 0.05 * clean_loss
    stats = callback.stats
    assert stats["rollbacks"] >= 1
    [(start, stop)] = stats["skip_ledger"]
    assert start <= POISON_START and stop >= POISON_START + POISON_BATCHES
    # STEPS useful steps; Lightning's global_step also counts the ones the rollback undid
    # (the ledger's batches up to the rollback), never the skip_ahead batches passed
    # over (they never reach training_step); the schedule followed the useful steps only.
    assert callback.step_count == STEPS
    assert trainer.global_step == STEPS + stats["skipped_batches"] - POISON_BATCHES
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS
    assert trainer.max_steps == STEPS  # the trainer's own limit is given back


def test_healthy_run_is_left_alone(clean_loss: float) -> None:
    callback = guard_callback()
    model, trainer = fit(make_data(DATA_BATCHES), callback)
    stats = callback.stats
    assert (stats["rollbacks"], stats["skipped_steps"], stats["skipped_batches"]) == (0, 0, 0)
    assert trainer.global_step == callback.step_count == STEPS
    assert held_out_loss(model) == pytest.approx(clean_loss, rel=1e-6)


def test_nan_batch_is_skipped_and_parameters_stay_finite() -> None:
    data = make_data(120, nan_at=80)
    unguarded, _ = fit(data, max_steps=100)
    assert not all(torch.isfinite(p).all() for p in unguarded.parameters())
    callback = guard_callback()
    model, _ = fit(data, callback, max_steps=100)
    assert callback.stats["skipped_steps"] >= 1
    assert callback.stats["rollbacks"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_halt_stops_the_trainer(caplog: pytest.LogCaptureFixture) -> None:
    config = MonitorConfig(policy=PolicyConfig(margin=20, max_rollbacks=0))
    callback = SpikewatchCallback(config=config, snapshot_every=10)
    poison = range(POISON_START, POISON_START + POISON_BATCHES)
    _, trainer = fit(make_data(DATA_BATCHES, poison=poison), callback)
    assert callback.stats["halted"] and callback.stats["rollbacks"] == 0
    assert POISON_START < trainer.global_step < POISON_START + POISON_BATCHES
    assert "spikewatch stops the Lightning trainer" in caplog.text
    assert "rollback budget is spent" in callback.stats["halt_reason"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"snapshot_every": 0}, "snapshot_every=0"),
        ({"keep_snapshots": 1.5}, "keep_snapshots=1.5"),
        ({"margin": -1}, "margin=-1"),
        ({"run_id": ""}, "run_id=''"),
        ({"config": {"threshold": 6}}, "config="),
    ],
)
def test_bad_option_fails_at_construction(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SpikewatchCallback(**options)


@pytest.mark.parametrize(
    ("module", "trainer_options", "message"),
    [
        (ManualClassifier, {}, "automatic_optimization=False .*SpikeGuard"),
        (TwoSchedulers, {}, "configure_optimizers='2 lr schedulers'"),
    ],
)
def test_unsupported_setup_fails_at_fit_start(
    module: type[Classifier], trainer_options: dict[str, Any], message: str
) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SpikewatchCallback()],
        **trainer_options,
    )
    with pytest.raises(ConfigError, match=message):
        trainer.fit(module(), DataLoader(make_data(8), batch_size=BATCH))


@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable")
def test_state_survives_a_lightning_checkpoint(
    guarded_run: tuple[Classifier, pl.Trainer, SpikewatchCallback], tmp_path: Path
) -> None:
    _, trainer, callback = guarded_run
    state = callback.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain JSON types
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    resumed = guard_callback()
    trainer2 = make_trainer(resumed, max_steps=STEPS + 10)
    loader = DataLoader(make_data(DATA_BATCHES), batch_size=BATCH, shuffle=False)
    trainer2.fit(Classifier(), loader, ckpt_path=path)
    assert resumed.step_count == STEPS + 10
    assert resumed.stats["skip_ledger"] == callback.stats["skip_ledger"]
    assert resumed.stats["rollbacks"] == callback.stats["rollbacks"]
