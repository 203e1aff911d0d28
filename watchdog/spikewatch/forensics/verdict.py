"""The forensics settings and the verdict a probe ends with (a JSON wire type)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from spikewatch.errors import WireFormatError, bad_value
from spikewatch.validation import check_float, check_int

Cause = Literal["data", "state", "unknown"]
CAUSES: tuple[Cause, ...] = ("data", "state", "unknown")
OnState = Literal["lr_cut", "halt", "none"]


@dataclass(frozen=True)
class ForensicsConfig:
    """How the trainer probes after a rollback, and what the policy does with the verdict.

    The probe re-evaluates the suspect batches (the data from the onset to the
    detection), forward only, from the restored pre-onset state, next to a few ordinary
    batches the restored state has not trained on either (`spikewatch_hooks.forensics`).

    Attributes:
        enabled: probe after every automatic rollback (when the hook can fetch the
            batches and compute their loss; otherwise the verdict is ``unknown`` and
            says why).
        max_suspect: probe at most this many suspect batches (forward passes).
        reference_batches: ordinary batches to compare them with.
        max_seconds: stop probing after this long (the verdict uses what was probed).
        batch_ratio / batch_z: a suspect batch is an outlier when its loss is at least
            ``batch_ratio`` times the reference median and ``batch_z`` robust sigmas
            above it.
        sample_ratio / sample_z: the same test for one sample against the reference
            samples (per-sample losses), with ``sample_z`` spreads of log-loss (per-sample
            losses are heavy-tailed); outlying samples are named.
        state_ratio: no outlying batch or sample, and a suspect median at most
            ``state_ratio`` times the reference median: the data looks ordinary, ``state``.
        min_reference: fewer reference batches than this: ``unknown``.
        on_state: ``lr_cut`` (escalate at once: the LR cut the policy would make when
            the trouble returned, made on this rollback; a rollback the policy already
            escalated keeps its cut), ``halt``, or ``none`` (wait for it to return).

    Example:
        >>> ForensicsConfig(on_state="halt").on_state
        'halt'
        >>> ForensicsConfig(on_state="cut")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: forensics.on_state='cut' is invalid: use "lr_cut", ...
    """

    enabled: bool = True
    max_suspect: int = 32
    reference_batches: int = 8
    max_seconds: float = 60.0
    batch_ratio: float = 1.25
    batch_z: float = 6.0
    sample_ratio: float = 1.5
    sample_z: float = 4.0
    state_ratio: float = 1.10
    min_reference: int = 2
    on_state: OnState = "lr_cut"

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise bad_value("forensics.enabled", self.enabled, "use true or false")
        check_int("forensics.max_suspect", self.max_suspect, minimum=1)
        check_int("forensics.reference_batches", self.reference_batches, minimum=1)
        check_float("forensics.max_seconds", self.max_seconds, minimum=0.0, inclusive=False)
        for name in ("batch_ratio", "sample_ratio", "state_ratio"):
            check_float(f"forensics.{name}", getattr(self, name), minimum=1.0)
        check_float("forensics.batch_z", self.batch_z, minimum=0.0, inclusive=False)
        check_float("forensics.sample_z", self.sample_z, minimum=0.0, inclusive=False)
        check_int("forensics.min_reference", self.min_reference, minimum=1)
        if self.state_ratio > self.batch_ratio:
            raise bad_value(
                "forensics.state_ratio", self.state_ratio, "use a value <= forensics.batch_ratio"
            )
        if self.on_state not in ("lr_cut", "halt", "none"):
            raise bad_value("forensics.on_state", self.on_state, 'use "lr_cut", "halt" or "none"')


@dataclass(frozen=True)
class Verdict:
    """What the probe found: ``cause`` and the numbers behind it.

    Attributes:
        cause: ``data`` (the suspect batches are outliers even from the healthy state),
            ``state`` (they look ordinary from it: the trouble was the model's state)
            or ``unknown`` (the probe could not run, or the numbers are in between).
        incident: the incident the rollback was for.
        step: the step the rollback was decided at; onset_step its onset.
        suspect_positions: data positions of the suspect batches probed.
        outlier_positions: those whose loss stood out.
        suspect_loss / reference_loss: median batch loss of each group (None: none).
        samples: the outlying samples, ``{"position", "index", "loss"}`` (``index``: the
            dataset index, None when the hook could not tell it).
        forward_passes / seconds: what the probe cost.
        why: the verdict in words, with its numbers.
        action: what the policy did with it (filled in by the monitor).

    Example:
        >>> v = Verdict(cause="unknown", incident="r:1", step=9, onset_step=5,
        ...             why="no probe_loss given")
        >>> Verdict.from_json(v.to_json()) == v
        True
    """

    cause: Cause
    incident: str
    step: int
    onset_step: int
    suspect_positions: list[int] = field(default_factory=list)
    outlier_positions: list[int] = field(default_factory=list)
    suspect_loss: float | None = None
    reference_loss: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    forward_passes: int = 0
    seconds: float = 0.0
    why: str = ""
    action: str = ""

    @property
    def ratio(self) -> float | None:
        """Suspect over reference median loss (None when either is missing)."""
        if self.suspect_loss is None or not self.reference_loss:
            return None
        return self.suspect_loss / self.reference_loss

    def summary(self) -> dict[str, Any]:
        """The short form for ``guard.stats["last_verdict"]``."""
        return {
            "cause": self.cause,
            "suspect_positions": list(self.suspect_positions),
            "suspect_loss": self.suspect_loss,
            "reference_loss": self.reference_loss,
            "samples": [dict(s) for s in self.samples],
            "why": self.why,
            "action": self.action,
        }

    def to_json(self) -> dict[str, Any]:
        """JSON types (a non-finite loss travels as NaN/Infinity, as in `StepRecord`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Verdict:
        """Parse `to_json` output; a bad field raises `WireFormatError` naming it."""
        if not isinstance(data, dict):
            raise WireFormatError(f"verdict must be a JSON object, got {type(data).__name__}")
        if data.get("cause") not in CAUSES:
            raise WireFormatError(
                f"verdict.cause={data.get('cause')!r} is invalid: expected one of "
                + ", ".join(CAUSES)
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise WireFormatError(f"verdict.{unknown[0]} is not a verdict field")
        try:
            return cls(**data)
        except TypeError as exc:
            raise WireFormatError(f"verdict is invalid: {exc}") from None
