"""Wire types: plain dataclasses that travel between hook, monitor and sinks as JSON.

Stdlib only, so the trainer side and the service agree without importing each other.
Non-finite losses are valid data: they travel as the JSON literals ``NaN`` and
``Infinity`` that Python's `json` module reads and writes.

Example:
    >>> import json
    >>> rec = StepRecord(run="gpt", step=7, loss=float("nan"), grad_norm=1.5)
    >>> text = json.dumps(rec.to_json())
    >>> text[:56]
    '{"run": "gpt", "step": 7, "loss": NaN, "grad_norm": 1.5,'
    >>> StepRecord.from_json(json.loads(text)).step
    7
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from spikewatch.errors import WireFormatError

SignalKind = Literal["nonfinite", "spike", "level_shift", "divergence"]
Metric = Literal["loss", "grad_norm"]
Action = Literal["watch", "skip_step", "rollback", "halt"]
CommandAction = Literal["skip_step", "rollback", "halt", "resume"]

ACTION_SEVERITY: dict[str, int] = {"watch": 0, "skip_step": 1, "rollback": 2, "halt": 3}

_T = TypeVar("_T")


def _field_error(kind: str, name: str, value: object, want: str) -> WireFormatError:
    return WireFormatError(f"{kind}.{name}={value!r} is invalid: expected {want}")


def _number(kind: str, name: str, value: object, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        want = "a number or null" if optional else "a number (NaN and Infinity allowed)"
        raise _field_error(kind, name, value, want)
    try:
        return float(value)
    except OverflowError:  # an integer beyond the largest float
        raise _field_error(kind, name, value, "a number within the float range") from None


def _integer(kind: str, name: str, value: object, *, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _field_error(kind, name, value, "an integer" + (" or null" if optional else ""))
    return value


def _text(kind: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _field_error(kind, name, value, "a string")
    return value


def _choice(kind: str, name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _field_error(kind, name, value, "one of " + ", ".join(allowed))
    return str(value)


def _require_mapping(kind: str, data: object) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise WireFormatError(f"{kind} must be a JSON object, got {type(data).__name__}")
    return data


def _get(kind: str, data: dict[str, Any], name: str, default: object = dataclasses.MISSING) -> Any:
    if name in data:
        return data[name]
    if default is dataclasses.MISSING:
        raise WireFormatError(f"{kind}.{name} is missing: add the field")
    return default


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What a trainer reports for one optimizer step.

    Attributes:
        run: run identifier.
        step: optimizer step (0-based or 1-based, but never going backwards).
        loss: the step's (reduced) training loss; NaN/inf are valid values.
        grad_norm: total gradient norm before clipping, if known.
        lr: learning rate used for the step, if known.
        data_position: absolute position in the data order (batch index) of the step's batch.
        wall_time: seconds since the epoch when the step finished.
    """

    run: str
    step: int
    loss: float
    grad_norm: float | None = None
    lr: float | None = None
    data_position: int | None = None
    wall_time: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Return a dict of JSON types."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> StepRecord:
        """Validate and build a record; a bad field raises `WireFormatError` naming it."""
        d = _require_mapping("StepRecord", data)
        k = "StepRecord"
        step = _integer(k, "step", _get(k, d, "step"), optional=False)
        loss = _number(k, "loss", _get(k, d, "loss"), optional=False)
        assert step is not None and loss is not None  # optional=False guarantees it
        return cls(
            run=_text(k, "run", _get(k, d, "run")),
            step=step,
            loss=loss,
            grad_norm=_number(k, "grad_norm", _get(k, d, "grad_norm", None), optional=True),
            lr=_number(k, "lr", _get(k, d, "lr", None), optional=True),
            data_position=_integer(
                k, "data_position", _get(k, d, "data_position", None), optional=True
            ),
            wall_time=_number(k, "wall_time", _get(k, d, "wall_time", None), optional=True),
        )


@dataclass(frozen=True, slots=True)
class Signal:
    """A detector's finding.

    ``stage`` is ``"streaming"`` for a stage-1 alarm raised on the step itself and
    ``"confirmed"`` once change-point analysis has localised it (onset, end, transient).
    ``incident`` ties together the signals of one episode (e.g. ``"loss-spike-919"``).
    """

    run: str
    kind: SignalKind
    metric: Metric
    step: int
    value: float
    score: float
    baseline: float
    onset_step: int
    peak_step: int
    end_step: int | None = None
    transient: bool | None = None
    shift: float = 0.0
    stage: Literal["streaming", "confirmed"] = "streaming"
    incident: str = ""

    def to_json(self) -> dict[str, Any]:
        """Return a dict of JSON types."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Signal:
        """Validate and build a signal."""
        d = _require_mapping("Signal", data)
        return _build(cls, "Signal", d)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy decided about one signal.

    ``rollback_before_step``: restore the newest snapshot taken at or before this step.
    ``lr_factor``: multiply the learning rate by this after a rollback (escalation).
    ``skip_ahead``: after a rollback, also skip this many batches not yet read (the bad
    data often runs on past the detection point; PaLM skipped 200-500 batches).
    """

    run: str
    step: int
    action: Action
    reason: str
    signal: Signal | None = None
    rollback_before_step: int | None = None
    lr_factor: float = 1.0
    escalation: int = 0
    skip_ahead: int = 0

    def to_json(self) -> dict[str, Any]:
        """Return a dict of JSON types."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Decision:
        """Validate and build a decision."""
        d = dict(_require_mapping("Decision", data))
        if d.get("signal") is not None:
            d["signal"] = Signal.from_json(d["signal"])
        return _build(cls, "Decision", d)


@dataclass(frozen=True, slots=True)
class Command:
    """An instruction for the trainer, applied at the next step boundary."""

    run: str
    id: str
    action: CommandAction
    reason: str
    issued_step: int
    rollback_before_step: int | None = None
    lr_factor: float = 1.0
    skip_ahead: int = 0

    def to_json(self) -> dict[str, Any]:
        """Return a dict of JSON types."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Command:
        """Validate and build a command."""
        return _build(cls, "Command", _require_mapping("Command", data))


_CHOICES: dict[str, tuple[str, ...]] = {
    "kind": get_args(SignalKind),
    "metric": get_args(Metric),
    "stage": ("streaming", "confirmed"),
}


def _build(cls: type[_T], kind: str, d: dict[str, Any]) -> _T:
    """Check every field of a flat wire dataclass against its annotation, then build it."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = _get(kind, d, f.name, f.default)
        values[f.name] = _check_field(kind, f.name, str(f.type), value, cls)
    return cls(**values)


def _check_field(kind: str, name: str, annotation: str, value: object, cls: type) -> object:
    optional = "None" in annotation
    if name == "action":
        allowed = get_args(CommandAction) if cls is Command else get_args(Action)
        return _choice(kind, name, value, allowed)
    if name in _CHOICES:
        return _choice(kind, name, value, _CHOICES[name])
    if annotation.startswith("int"):
        return _integer(kind, name, value, optional=optional)
    if annotation.startswith("float"):
        return _number(kind, name, value, optional=optional)
    if annotation.startswith("bool"):
        if not (isinstance(value, bool) or (optional and value is None)):
            raise _field_error(kind, name, value, "true, false" + (" or null" if optional else ""))
        return value
    if annotation == "str":
        return _text(kind, name, value)
    return value
