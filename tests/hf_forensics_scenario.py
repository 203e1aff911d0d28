"""Forensics runs in a real ``transformers.Trainer``: bad data, or a bad learning rate.

The data are character windows of the demo corpus (`hf_scenario`), each item with its
dataset index (``sample``, taken off before the forward by `hf_scenario.PositionLog`).

- ``data``: a contiguous range of examples, starting and ending mid-batch, are random
  tokens; read in order, so they meet the run as a burst of bad batches at
  ``poison_start`` with clean examples on both edges;
- ``lr``: clean data, and the learning rate jumps ``lr_jump`` x at ``lr_step`` (a
  schedule bug, in a scheduler passed with ``Trainer(optimizers=...)``).

Models: a tiny GPT-2 or LLaMA built from a config (no download).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hf_scenario import PositionLog, tiny_gpt, trainer_args
from hf_scenario import Scenario as RunSizes
from spikewatch.forensics.verdict import ForensicsConfig
from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.adapters.hf import SpikewatchCallback
from spikewatch_hooks.demo.corpus import CharCorpus

Arch = Literal["gpt2", "llama"]


@dataclass(frozen=True)
class Forensic:
    """One run's sizes and its trouble."""

    steps: int = 300
    batch_size: int = 16  # examples per micro-batch (one data position)
    accumulation: int = 1  # gradient_accumulation_steps
    examples: int | None = None  # dataset length (default: the steps and spare steps')
    context: int = 32
    lr: float = 6e-3
    warmup: int = 20
    spare_steps: int = 150  # data beyond max_steps, for the batches a rollback skips
    poison_start: int = 240  # optimizer step of the first random-token examples
    poison_steps: int = 40
    poison_offset: int = 5  # the range starts (and ends) this many examples into a batch
    lr_step: int = 200
    lr_jump: float = 30.0
    sampling: str = "sequential"  # or "random": the Trainer's seeded sampler

    @property
    def poisoned(self) -> range:
        """Dataset indices of the random-token examples."""
        lo = self.poison_start * self.batch_size + self.poison_offset
        return range(lo, lo + self.poison_steps * self.batch_size)

    def samples_at(self, positions: list[int]) -> set[int]:
        """Dataset indices of the micro-batches at ``positions`` (read in order)."""
        b = self.batch_size
        return {i for p in positions for i in range(p * b, (p + 1) * b)}

    def sizes(self) -> RunSizes:
        """`hf_scenario`'s sizes, for its `trainer_args`."""
        return RunSizes(steps=self.steps, samples_per_step=self.batch_size * self.accumulation,
                        accumulation=self.accumulation, context=self.context, lr=self.lr,
                        warmup=self.warmup)  # fmt: skip


class TokenWindows(Dataset[dict[str, torch.Tensor]]):
    """Item ``i``: a seeded window of the text, or random tokens for ``poisoned`` ones."""

    def __init__(self, corpus: CharCorpus, s: Forensic, poisoned: range) -> None:
        g = torch.Generator().manual_seed(1)
        limit = int(len(corpus.tokens) * 0.9) - s.context
        n = s.examples or (s.steps + s.spare_steps) * s.batch_size * s.accumulation
        self.starts = torch.randint(0, limit, (n,), generator=g)
        self.tokens, self.vocab, self.context = corpus.tokens, corpus.vocab_size, s.context
        self.poisoned = poisoned

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i in self.poisoned:
            g = torch.Generator().manual_seed(i)
            x = torch.randint(0, self.vocab, (self.context,), generator=g)
        else:
            start = int(self.starts[i])
            x = self.tokens[start : start + self.context]
        return {"input_ids": x, "labels": x, "sample": torch.tensor(i)}


def tiny_llama(vocab: int, context: int) -> LlamaForCausalLM:
    """A two-layer LLaMA (grouped-query attention, RoPE, SwiGLU), seeded."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_model(arch: Arch, corpus: CharCorpus, s: Forensic) -> PreTrainedModel:
    """The run's model, built from a config."""
    if arch == "llama":
        return tiny_llama(corpus.vocab_size, s.context)
    return tiny_gpt(corpus.vocab_size, s.context)


def guard(s: Forensic, **options: Any) -> SpikewatchCallback:
    """The callback sized to the run (margin and skip_ahead in optimizer steps)."""
    policy = PolicyConfig(margin=20, skip_ahead=s.poison_steps, recurrence_steps=200)
    config = MonitorConfig(policy=policy, forensics=ForensicsConfig())
    return SpikewatchCallback(run_id="hf-forensics", config=config, snapshot_every=10,
                              keep_snapshots=8, **options)  # fmt: skip


@dataclass
class Rollbacks(TrainerCallback):
    """After each step: at every new rollback, the verdict and LR scale it left."""

    watch: SpikewatchCallback
    seen: list[dict[str, Any]] = field(default_factory=list)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        engine = self.watch.engine
        if engine.stats["rollbacks"] > len(self.seen):
            last = None if engine.forensics is None else engine.forensics.last_verdict
            self.seen.append({"cause": None if last is None else last.cause,
                              "lr_scale": engine.lr_scale, "step": engine.step_count})  # fmt: skip


def lr_jump_schedule(s: Forensic, jump: bool) -> Any:
    """Warm-up and cosine, times ``lr_jump`` from ``lr_step`` on when ``jump``."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / s.warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(step, s.steps) / s.steps))
        return warm * max(cosine, 0.1) * (s.lr_jump if jump and step >= s.lr_step else 1.0)

    return factor


def train_run(
    corpus: CharCorpus,
    tmp_path: Path,
    s: Forensic,
    *,
    trouble: Literal["data", "lr", "none"],
    callbacks: list[TrainerCallback],
    arch: Arch = "gpt2",
    model: PreTrainedModel | None = None,
    **overrides: Any,
) -> tuple[PreTrainedModel, Trainer]:
    """Train one run (``model``: instead of the ``arch`` one; ``resume_from_checkpoint``
    goes to ``trainer.train``); the model and the trainer."""
    model = model or tiny_model(arch, corpus, s)
    PositionLog(model, s.batch_size)  # takes the sample column off before the forward
    poisoned = s.poisoned if trouble == "data" else range(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_jump_schedule(s, trouble == "lr"))
    resume = overrides.pop("resume_from_checkpoint", None)
    args = trainer_args(tmp_path, s.sizes(), train_sampling_strategy=s.sampling, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=TokenWindows(corpus, s, poisoned),
                      callbacks=callbacks, optimizers=(optimizer, schedule))  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def precision_recall(named: set[int], poisoned: set[int]) -> tuple[float, float]:
    """Of the samples named, the share poisoned; of the poisoned, the share named."""
    hits = len(named & poisoned)
    return hits / max(len(named), 1), hits / max(len(poisoned), 1)
