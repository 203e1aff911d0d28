"""The forensics options of the framework callbacks (HF ``Trainer``, Lightning).

`SpikeGuard` takes the same four options as keyword arguments; the callbacks keep them
here, validated when the callback is built (a bad cap fails before training starts),
and `build` makes the `Forensics` on the engine at train start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spikewatch.errors import bad_value
from spikewatch.validation import check_int
from spikewatch_hooks.forensics.evaluate import ProbeLoss
from spikewatch_hooks.forensics.probe import Forensics, make_forensics

if TYPE_CHECKING:
    from spikewatch_hooks.core.engine import GuardEngine


@dataclass(frozen=True, kw_only=True, slots=True)
class ForensicsOptions:
    """What a callback was asked for.

    Example:
        >>> ForensicsOptions(probe_cache_batches=8).probe_cache_batches
        8
        >>> ForensicsOptions(probe_cache_bytes=0)
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: probe_cache_bytes=0 is invalid: use an integer >= 1
        >>> ForensicsOptions(probe_loss="loss")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: probe_loss='loss' is invalid: pass a function ...
    """

    #: ``probe_loss(model, batch)`` -> per-sample losses ([B]) or a scalar; None: the
    #: callback derives one where it can (HF heads, ``LightningModule.probe_loss``).
    probe_loss: ProbeLoss | None = None
    #: JSONL file of quarantined samples (read at train start, appended to).
    quarantine_file: str | os.PathLike[str] | None = None
    #: False: no probe, no batch kept, no quarantine.
    forensics: bool = True
    #: Recent batches kept for the probe (references, not copies), and their bytes.
    probe_cache_batches: int = 64
    probe_cache_bytes: int = 512 * 2**20

    def __post_init__(self) -> None:
        if self.probe_loss is not None and not callable(self.probe_loss):
            raise bad_value(
                "probe_loss", self.probe_loss, "pass a function (model, batch) -> loss tensor"
            )
        if not isinstance(self.forensics, bool):
            raise bad_value("forensics", self.forensics, "use True or False")
        check_int("probe_cache_batches", self.probe_cache_batches, minimum=1)
        check_int("probe_cache_bytes", self.probe_cache_bytes, minimum=1)

    def build(self, engine: GuardEngine, probe_loss: ProbeLoss | None) -> Forensics | None:
        """The engine's `Forensics` with ``probe_loss`` (the given or derived one); None
        when forensics is off, or there is neither a loss nor a quarantine file."""
        if not self.forensics:
            return None
        return make_forensics(
            engine, probe_loss, self.quarantine_file, self.probe_cache_batches,
            self.probe_cache_bytes,
        )  # fmt: skip
