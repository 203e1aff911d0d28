"""A real ``transformers.Trainer`` run of a tiny GPT-2 on CPU, shared by the HF tests.

The training data is character windows of the demo corpus, read in order
(``train_sampling_strategy="sequential"``), so optimizer step ``k`` of every run holds the
same examples and a poisoned range sits at the same steps in every run, with or without
gradient accumulation (a step is always ``samples_per_step`` examples). Every item
carries its index (``sample``); `PositionLog` takes it off before the model's forward and
records which data positions were computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.adapters.hf import SpikewatchCallback
from spikewatch_hooks.demo.corpus import CharCorpus


@dataclass(frozen=True)
class Scenario:
    """Sizes of one run; the poisoned steps sit ~80 % of the way through."""

    steps: int = 300
    poison_start: int = 240  # optimizer step of the first poisoned examples
    poison_batches: int = 40  # poisoned optimizer steps' worth of examples
    spare_batches: int = 150  # steps' worth of data beyond max_steps, for skipped data
    samples_per_step: int = 16
    accumulation: int = 1  # gradient_accumulation_steps (micro-batches per step)
    context: int = 32
    lr: float = 6e-3
    warmup: int = 20
    eval_batches: int = 8

    @property
    def batch_size(self) -> int:
        """Examples per micro-batch (one data position)."""
        return self.samples_per_step // self.accumulation

    @property
    def poisoned_positions(self) -> range:
        """Data positions (micro-batches) holding poisoned examples."""
        a = self.accumulation
        return range(self.poison_start * a, (self.poison_start + self.poison_batches) * a)


SCENARIO = Scenario()


class Windows(Dataset[dict[str, torch.Tensor]]):
    """Item ``i``: a seeded window of the text; items of poisoned steps get shifted labels."""

    def __init__(self, tokens: torch.Tensor, vocab: int, s: Scenario, *, poison: bool) -> None:
        g = torch.Generator().manual_seed(1)
        n = (s.steps + s.spare_batches) * s.samples_per_step
        limit = int(len(tokens) * 0.9) - s.context
        self.starts = torch.randint(0, limit, (n,), generator=g)
        self.tokens, self.vocab, self.context = tokens, vocab, s.context
        lo = s.poison_start * s.samples_per_step
        hi = (s.poison_start + s.poison_batches) * s.samples_per_step
        self.poisoned = range(lo, hi) if poison else range(0)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = int(self.starts[i])
        x = self.tokens[start : start + self.context]
        labels = (x + 7) % self.vocab if i in self.poisoned else x
        return {"input_ids": x, "labels": labels, "sample": torch.tensor(i)}


class PositionLog:
    """Takes the ``sample`` column off every forward call and records the training ones."""

    def __init__(self, model: torch.nn.Module, batch_size: int) -> None:
        self.batch_size = batch_size
        self.positions: list[int] = []  # one per training forward call, in order
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        sample = kwargs.pop("sample", None)
        if sample is not None and module.training:
            self.positions.append(int(sample.reshape(-1)[0]) // self.batch_size)
        return args, kwargs


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


def trainer_args(tmp_path: Path, s: Scenario, **overrides: Any) -> TrainingArguments:
    """The runs' ``TrainingArguments`` (``overrides`` win)."""
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "logging_steps": 50,  # as teams log; the callback needs no logging
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "max_steps": s.steps,
        "per_device_train_batch_size": s.batch_size,
        "gradient_accumulation_steps": s.accumulation,
        "learning_rate": s.lr,
        "weight_decay": 0.1,
        "lr_scheduler_type": "cosine",
        "warmup_steps": s.warmup,
        "dataloader_num_workers": 0,
        "train_sampling_strategy": "sequential",
        "remove_unused_columns": False,  # PositionLog takes the sample column off
        "seed": 0,
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**settings, **overrides})


def make_trainer(
    corpus: CharCorpus,
    tmp_path: Path,
    s: Scenario,
    *,
    poison: bool,
    callbacks: list[TrainerCallback],
    model: GPT2LMHeadModel | None = None,
    **overrides: Any,
) -> tuple[GPT2LMHeadModel, Trainer, PositionLog]:
    """A Trainer on the scenario's data, and the log of the positions it computes."""
    model = model or tiny_gpt(corpus.vocab_size, s.context)
    positions = PositionLog(model, s.batch_size)
    data = Windows(corpus.tokens, corpus.vocab_size, s, poison=poison)
    args = trainer_args(tmp_path, s, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    return model, trainer, positions


def train(
    corpus: CharCorpus,
    tmp_path: Path,
    s: Scenario,
    *,
    poison: bool,
    callback: SpikewatchCallback | None = None,
    model: GPT2LMHeadModel | None = None,
    **overrides: Any,
) -> tuple[GPT2LMHeadModel, Trainer, PositionLog]:
    """Train one run with a real Trainer; return the model, the trainer, the positions."""
    callbacks: list[TrainerCallback] = [] if callback is None else [callback]
    model, trainer, positions = make_trainer(
        corpus, tmp_path, s, poison=poison, callbacks=callbacks, model=model, **overrides
    )
    trainer.train()
    return model, trainer, positions


def held_out_loss(model: GPT2LMHeadModel, corpus: CharCorpus, s: Scenario) -> float:
    """Mean loss on fixed, clean windows of the last 10 % of the text."""
    g = torch.Generator().manual_seed(2)
    low, high = int(len(corpus.tokens) * 0.9), len(corpus.tokens) - s.context
    starts = torch.randint(low, high, (s.eval_batches * 16,), generator=g)
    x = torch.stack([corpus.tokens[int(a) : int(a) + s.context] for a in starts])
    model.train(False)
    with torch.no_grad():
        losses = [float(model(input_ids=b, labels=b).loss) for b in torch.split(x, 16)]
    return sum(losses) / len(losses)


def guard_for(s: Scenario) -> SpikewatchCallback:
    """The guarded runs' callback: margin and skip_ahead in optimizer steps."""
    policy = PolicyConfig(margin=20, skip_ahead=s.poison_batches)
    return SpikewatchCallback(
        run_id="hf-test",
        config=MonitorConfig(policy=policy),
        snapshot_every=10,
        keep_snapshots=8,
    )
