"""The callback's state inside Hugging Face checkpoints, and where a resumed run stands.

The state rides in ``trainer_state.json`` of every ``checkpoint-N`` folder, under
``stateful_callbacks["spikewatch"]``: the Trainer writes that file with each checkpoint
(so the state and the model, optimizer and scheduler it describes are saved together)
and loads it back on ``trainer.train(resume_from_checkpoint=...)`` whatever the folder
is called now. The key is not a callback class name, so the Trainer's own
``restore_callback_states_from_checkpoint`` (which would build a new callback with
default options) leaves it alone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from spikewatch_hooks.adapters.hf.live import loader_length
from spikewatch_hooks.state.checkpoint import CheckpointError

if TYPE_CHECKING:
    from transformers import TrainerState, TrainingArguments

    from spikewatch_hooks.adapters.hf.taps import TrainerTaps
    from spikewatch_hooks.core.engine import GuardEngine

log = logging.getLogger("spikewatch_hooks.adapters.hf.callback")

STATE_KEY = "spikewatch"
STATE_VERSION = 1


def checkpoint_state(guard: dict[str, Any], *, target: int, next_position: int) -> dict[str, Any]:
    """What a resumed run needs: the guard's state, the owed steps, the data consumed.

    Example:
        >>> checkpoint_state({"step": 3}, target=300, next_position=7)["next_position"]
        7
    """
    return {"version": STATE_VERSION, "guard": guard, "target": target,
            "next_position": next_position}  # fmt: skip


def saved_state(stateful_callbacks: Any) -> dict[str, Any] | None:
    """The callback's state in a loaded ``TrainerState``, or None when there is none.

    Example:
        >>> saved_state({}) is None
        True
        >>> saved_state({"spikewatch": {"version": 99}})
        Traceback (most recent call last):
        ...
        spikewatch_hooks.state.checkpoint.CheckpointError: the checkpoint's spikewatch state ...
    """
    if not isinstance(stateful_callbacks, dict):
        return None
    state = stateful_callbacks.get(STATE_KEY)
    if state is None:
        return None
    if not isinstance(state, dict):
        state = {}
    version = state.get("version")
    if version != STATE_VERSION:
        raise CheckpointError(
            f"the checkpoint's spikewatch state has version {version!r}; this spikewatch "
            f"reads version {STATE_VERSION}: resume with the spikewatch release that wrote it"
        )
    return cast(dict[str, Any], state)


def resumed_position(
    *,
    global_step: int,
    accumulation: int,
    loader_length: int | None,
    max_steps: int,
    ignore_data_skip: bool,
) -> int:
    """Data position of the first batch a resumed Trainer's loader yields.

    The Trainer resumes at epoch ``global_step // steps_per_epoch`` and, unless
    ``ignore_data_skip``, skips ``global_step % steps_per_epoch`` optimizer steps' worth
    of batches in it (transformers 5.x ``_init_training_state``).

    Example:
        >>> resumed_position(global_step=260, accumulation=4, loader_length=450 * 4,
        ...                  max_steps=300, ignore_data_skip=False)
        1040
        >>> resumed_position(global_step=500, accumulation=1, loader_length=450,
        ...                  max_steps=600, ignore_data_skip=False)
        500
    """
    if loader_length is None:  # no length: the Trainer makes one epoch of max_steps
        per_epoch, epoch_length = max(max_steps, 1), max(max_steps, 1) * accumulation
    else:
        per_epoch = max(loader_length // accumulation + int(loader_length % accumulation > 0), 1)
        epoch_length = loader_length
    epochs, steps_in_epoch = divmod(global_step, per_epoch)
    skipped = 0 if ignore_data_skip else steps_in_epoch * accumulation
    return epochs * epoch_length + skipped


def resume_guard(
    engine: GuardEngine,
    taps: TrainerTaps,
    *,
    args: TrainingArguments,
    state: TrainerState,
    loader: Any,
    accumulation: int,
) -> int | None:
    """Continue the guard where the checkpoint left it (positions, ledger, owed steps);
    return the steps owed on the surviving branch (None: the checkpoint has no state)."""
    start = resumed_position(
        global_step=state.global_step, accumulation=accumulation,
        loader_length=loader_length(loader), max_steps=int(args.max_steps),
        ignore_data_skip=bool(args.ignore_data_skip),
    )  # fmt: skip
    taps.next_position = start
    saved = saved_state(state.stateful_callbacks)
    if saved is None:
        log.warning(
            "spikewatch: resumed at step %d from a checkpoint without spikewatch state "
            "(saved without the callback?): the skip ledger starts empty",
            state.global_step,
        )
        return None
    engine.load_guard_state(saved["guard"])
    target = int(saved["target"])
    # Ledger batches dropped before the checkpoint still count in the Trainer's
    # arithmetic: the loader restarts that many batches early; drop them unseen.
    taps.discard = max(int(saved["next_position"]) - start, 0)
    state.max_steps = state.global_step + target - engine.step_count
    return target


def store_state(
    state: TrainerState, engine: GuardEngine, *, target: int, taps: TrainerTaps
) -> None:
    """Put the guard's state in ``state`` (a checkpoint is due: it goes into its
    ``trainer_state.json``)."""
    payload = checkpoint_state(
        engine.guard_state(), target=target, next_position=taps.next_position
    )
    # After __post_init__ the field holds a dict of states (its annotation says list).
    stored = cast(dict[str, Any], state.stateful_callbacks)
    stored[STATE_KEY] = payload
