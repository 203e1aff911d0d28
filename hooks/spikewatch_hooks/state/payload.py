"""What a single-file checkpoint holds besides the guard's own state.

Model, every optimizer and scheduler, the extras (the GradScaler) and the RNGs. Files
written before several optimizers were supported hold ``optimizer``/``scheduler``
(one each); they still load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spikewatch_hooks.state.checkpoint import CheckpointError
from spikewatch_hooks.state.rng import rng_state, set_rng_state

if TYPE_CHECKING:  # the engine calls these functions: no import back up at run time
    from spikewatch_hooks.core.engine import GuardEngine


def training_payload(engine: GuardEngine) -> dict[str, Any]:
    """The live training state of ``engine``, for `save_checkpoint`."""
    return {
        "model": engine.model.state_dict(),
        "optimizers": [o.state_dict() for o in engine.optimizers],
        "schedulers": [s.state_dict() for s in engine.schedulers],
        "extras": {k: v.state_dict() for k, v in engine.updates.extras.items()},
        "rng": rng_state(),
    }


def load_training_payload(engine: GuardEngine, saved: dict[str, Any]) -> None:
    """Load a `training_payload` (or an older file's) into ``engine``'s live objects.

    Raises `CheckpointError` before touching anything when the number of optimizers
    or schedulers differs from the live ones.
    """
    optimizers = saved.get("optimizers", [saved.get("optimizer")])
    schedulers = saved.get("schedulers")
    if schedulers is None:
        schedulers = [] if saved.get("scheduler") is None else [saved["scheduler"]]
    if len(optimizers) != len(engine.optimizers):
        raise CheckpointError(
            f"the checkpoint holds {len(optimizers)} optimizer(s), the guard has "
            f"{len(engine.optimizers)}; pass the same optimizers, in the same order"
        )
    if engine.schedulers and len(schedulers) != len(engine.schedulers):
        raise CheckpointError(
            f"the checkpoint holds {len(schedulers)} scheduler(s), the guard has "
            f"{len(engine.schedulers)}; pass the same schedulers, in the same order"
        )
    engine.model.load_state_dict(saved["model"])
    for opt, state in zip(engine.optimizers, optimizers, strict=True):
        opt.load_state_dict(state)
    for scheduler, state in zip(engine.schedulers, schedulers, strict=False):
        scheduler.load_state_dict(state)
    extras = saved.get("extras", {})
    for name, obj in engine.updates.extras.items():
        if name in extras:
            obj.load_state_dict(extras[name])
    set_rng_state(saved["rng"])
