"""Lightning manual optimization with two optimizers: the documented recipe (README,
"Lightning: manual optimization") with SpikeGuard inside ``training_step``, on a real
``L.Trainer`` on CPU; and the callback's refusal pointing to it."""

from __future__ import annotations

import copy
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from spikewatch.errors import ConfigError
from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.adapters.lightning import SpikewatchCallback
from spikewatch_hooks.guard import SpikeGuard

BAD = range(150, 180)  # the discriminator's loss of these batches jumps x50 and stays up


class TinyGAN(pl.LightningModule):
    """A generator and a discriminator, one optimizer each, guarded by one SpikeGuard."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = torch.nn.Linear(4, 8)
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                                 torch.nn.Linear(8, 1))  # fmt: skip
        self.guard: SpikeGuard | None = None
        self.position = -1  # batches seen since the run began (a fixed data order)
        self.trained: list[int] = []
        self.checks: list[bool] = []
        self.at_snapshot: dict[int, Any] = {}

    def configure_optimizers(self) -> Any:
        g_opt = torch.optim.AdamW(self.generator.parameters(), lr=1e-2)
        d_opt = torch.optim.SGD(self.discriminator.parameters(), lr=5e-2, momentum=0.9)
        return g_opt, d_opt

    def on_train_start(self) -> None:
        config = MonitorConfig(policy=PolicyConfig(margin=10, skip_ahead=20))
        self.guard = SpikeGuard(self, self._optimizers(), config=config, snapshot_every=10)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        guard = self.guard
        assert guard is not None
        self.position += 1
        if not guard.accept(self.position):  # in the skip ledger, or halted
            self.trainer.should_stop = guard.halted
            return
        (real,) = batch
        fake = self.generator(torch.randn(real.shape[0], 4))
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        d_loss = bce(self.discriminator(real), ones) + bce(self.discriminator(fake.detach()), zeros)
        g_loss = bce(self.discriminator(fake), ones)
        if self.position in BAD:
            d_loss = d_loss * 50.0
        self.manual_backward(d_loss)
        self.manual_backward(g_loss, inputs=list(self.generator.parameters()))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        decision = guard.step(loss=(d_loss + g_loss).detach(), grad_norm=grad_norm)
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)
        if decision is not None and decision.action == "rollback":
            self.trained = []
            self.checks.append(_equal(self._state(), self.at_snapshot[guard.step_count]))
        else:
            self.trained.append(self.position)
            if guard.step_count % 10 == 0:
                self.at_snapshot[guard.step_count] = self._state()

    def _optimizers(self) -> list[Any]:
        """The LightningOptimizers: the guard steps them, so Lightning counts the steps."""
        opts = self.optimizers()
        return opts if isinstance(opts, list) else [opts]

    def _state(self) -> Any:
        opts = [o.optimizer for o in self._optimizers()]
        return copy.deepcopy([self.state_dict(), [o.state_dict() for o in opts]])


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _trainer(**kwargs: Any) -> Any:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


def _loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(260 * 8, 8, generator=g) + 1.0), batch_size=8)


def test_manual_optimization_with_two_optimizers_rolls_back_both_exactly() -> None:
    torch.manual_seed(0)
    model = TinyGAN()
    _trainer(max_epochs=1).fit(model, _loader())
    guard = model.guard
    assert guard is not None
    assert guard.stats["rollbacks"] == 1 and not guard.halted
    assert model.checks == [True]  # generator, discriminator, both optimizers: exact
    [(start, stop)] = guard.stats["skip_ledger"]
    assert start <= BAD.start and stop >= BAD.stop
    assert not [p for p in model.trained if p in BAD]
    # Lightning counted the guard's optimizer steps (LightningOptimizer.step).
    assert model.trainer.global_step > 0
    assert all(len(o.optimizer.state) > 0 for o in model._optimizers())


def test_the_callback_refuses_manual_optimization_and_points_to_the_recipe() -> None:
    model = TinyGAN()
    with pytest.raises(ConfigError, match=r"README section 'Lightning: manual optimization'"):
        _trainer(max_steps=2, callbacks=[SpikewatchCallback()]).fit(model, _loader())
