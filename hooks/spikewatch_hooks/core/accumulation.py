"""Gradient accumulation: how many loader batches make one optimizer step.

Steps count optimizer steps and data positions count loader batches (micro-batches).
The two meet in ``skip_ahead``, which the policy gives in steps and the skip ledger
needs in batches: `GuardEngine.batches_per_step` converts it. A hook knows the ratio
(Lightning's ``accumulate_grad_batches``, SpikeGuard's ``accumulation_steps=``) or
counts it: the batches `SpikeGuard.batches` yielded between two ``step`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spikewatch.validation import check_int


@dataclass(kw_only=True, slots=True)
class Accumulation:
    """Loader batches per optimizer step, given or counted.

    Example:
        >>> acc = Accumulation.build(None)
        >>> acc.yielded = 4           # SpikeGuard.batches yielded four micro-batches
        >>> class Engine: batches_per_step = 1; optimizer = None
        >>> engine = Engine()
        >>> acc.micro_batch(engine), engine.batches_per_step, acc.yielded
        (False, 4, 0)
        >>> Accumulation.build(0)
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: accumulation_steps=0 is invalid: use an integer >= 1
    """

    #: Batches per optimizer step while nothing is counted (or the given ratio).
    batches_per_step: int = 1
    #: True when the ratio was given (``accumulation_steps=``): never counted.
    fixed: bool = False
    #: Batches `SpikeGuard.batches` yielded since the last optimizer step.
    yielded: int = 0

    @classmethod
    def build(cls, accumulation_steps: int | None) -> Accumulation:
        """Validate ``accumulation_steps`` (None: count the ratio)."""
        if accumulation_steps is None:
            return cls()
        steps = check_int("accumulation_steps", accumulation_steps, minimum=1)
        return cls(batches_per_step=steps, fixed=True)

    def micro_batch(self, engine: Any) -> bool:
        """Called at each ``SpikeGuard.step``: True when it is no optimizer step (an
        accelerate ``accumulate()`` micro-batch that does not sync gradients); else
        record the counted ratio on the engine and start counting again."""
        state = getattr(engine.optimizer, "gradient_state", None)  # accelerate's optimizer
        if state is not None and getattr(state, "sync_gradients", True) is False:
            return True
        if not self.fixed and self.yielded > 0:
            self.batches_per_step = self.yielded
        engine.batches_per_step = self.batches_per_step
        self.yielded = 0
        return False
