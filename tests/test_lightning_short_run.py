"""SpikewatchCallback on a short Lightning run: defaults fitted to the run length, or a
warning naming the explicit settings that are out of proportion (real training on CPU)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

pytest.importorskip("lightning")

import torch

from lightning_task import Numbered, loader, make_trainer, numbered_data
from spikewatch_hooks.adapters.lightning import SpikewatchCallback
from spikewatch_hooks.core.run_length import RunLengthWarning, check_run_length

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]

BATCH = 32


@pytest.fixture(autouse=True, scope="module")
def _torch_settings() -> Iterator[None]:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def fit(callback: SpikewatchCallback, *, batches: int, **trainer_options: object) -> None:
    trainer = make_trainer([callback], **trainer_options)  # type: ignore[arg-type]
    trainer.fit(Numbered(steps=batches), loader(numbered_data(batches, BATCH), BATCH))


def test_defaults_fit_the_run_lightning_will_make() -> None:
    callback = SpikewatchCallback()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunLengthWarning)
        # 2 epochs of 60 batches, 4 per optimizer step: 30 optimizer steps (max_steps is
        # larger), what trainer.estimated_stepping_batches says.
        fit(callback, batches=60, max_steps=1000, max_epochs=2, accumulate_grad_batches=4)
    expected = check_run_length(
        30, margin=100, skip_ahead=100, snapshot_every=100, keep_snapshots=4
    )
    policy = callback.config.policy
    assert callback.engine is not None
    assert (policy.margin, policy.skip_ahead, callback.engine.snapshot_every) == (
        expected.margin,
        expected.skip_ahead,
        expected.snapshot_every,
    )
    assert callback.step_count == 30


def test_explicit_settings_out_of_proportion_warn_at_train_start() -> None:
    callback = SpikewatchCallback(margin=100, snapshot_every=20)
    with pytest.warns(RunLengthWarning, match=r"margin=100 with snapshot_every=20 .*40 steps"):
        fit(callback, batches=50, max_steps=40)
    assert callback.config.policy.margin == 100  # kept, as given
    assert callback.engine is not None and callback.engine.snapshot_every == 20
