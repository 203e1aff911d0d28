"""A guarded, poisoned HF ``Trainer`` run that checkpoints and then stalls (the tests kill it).

Usage: python tests/hf_resume_worker.py OUT_DIR SAVE_STEPS STALL_AT
Checkpoints go to ``OUT_DIR/checkpoint-N`` every SAVE_STEPS steps; once the one at
global step STALL_AT is written, ``OUT_DIR/saved`` appears and the process sleeps, so
the test can SIGKILL it there, as a crash would.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_scenario import SCENARIO, guard_for, make_trainer
from spikewatch_hooks.demo.corpus import CharCorpus, corpus_text


class StallAfterSave(TrainerCallback):
    """Sleeps after the checkpoint at ``at``, once it is on disk."""

    def __init__(self, at: int, marker: Path) -> None:
        self.at, self.marker = at, marker

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if state.global_step == self.at:
            self.marker.write_text(str(state.global_step))
            time.sleep(600)


def main() -> None:
    out, save_steps, stall_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    corpus = CharCorpus(corpus_text(200_000))
    callbacks = [guard_for(SCENARIO), StallAfterSave(stall_at, out / "saved")]
    _, trainer, _ = make_trainer(
        corpus, out, SCENARIO, poison=True, callbacks=callbacks,
        save_strategy="steps", save_steps=save_steps,
    )  # fmt: skip
    trainer.train()


if __name__ == "__main__":
    main()
