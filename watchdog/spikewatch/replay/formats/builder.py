"""Turn raw rows of any format into a `Curve`: names, numbers, step order, dropped rows.

Every format reader hands its rows to one `CurveBuilder`, so every format treats a
missing value the same way and fails with the same one-line `ReplayInputError`.

What a value means:

* ``nan``, ``inf``, ``-inf`` (and the JSON literals ``NaN``/``Infinity``) are data: the
  step really logged a non-finite value, and the monitor should see it.
* A blank CSV cell, a missing JSON key or a JSON ``null`` is *no value*: nothing was
  logged for that metric at that step (a grad norm logged every 10 steps). pandas
  writes ``null`` for NaN too, but a ``null`` cannot be told apart from "not logged",
  and taking it for NaN would flag healthy runs, so ``null`` is no value.
* A row without a loss (an evaluation entry, another metric logged at the same step)
  is dropped and counted in `Curve.dropped` under ``"no loss"``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from spikewatch.errors import ReplayInputError
from spikewatch.replay.model import Curve

#: Accepted column names / JSON keys / TensorBoard tags, best first, compared after
#: lower-casing and turning ``-`` and spaces into ``_``.
ALIASES: dict[str, tuple[str, ...]] = {
    "step": (
        "step",
        "global_step",
        "trainer/global_step",
        "train/global_step",  # what the HF Trainer logs to W&B; `_step` counts log calls
        "current_steps",  # LLaMA-Factory's trainer_log.jsonl
        "_step",
        "iteration",
        "iter",
    ),
    "loss": ("loss", "train/loss", "train_loss", "loss/train", "training_loss", "train/train_loss"),
    "grad_norm": ("grad_norm", "train/grad_norm", "gradient_norm", "grad_norm/total"),
    "lr": ("lr", "learning_rate", "train/learning_rate", "train/lr", "lr/train"),
}
ROLES = tuple(ALIASES)
NO_LOSS = "no loss"


def normalize(name: str) -> str:
    """The form names are compared in.

    Example:
        >>> normalize(" Grad-Norm "), normalize("Loss/train")
        ('grad_norm', 'loss/train')
    """
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def pick(names: Iterable[str], role: str) -> str | None:
    """The name in ``names`` that is the best alias for ``role``, if any.

    Example:
        >>> pick(["_step", "train/loss", "train/global_step"], "step")
        'train/global_step'
    """
    by_alias = {normalize(n): n for n in reversed(list(names))}
    return next((by_alias[a] for a in ALIASES[role] if a in by_alias), None)


def read_text(path: Path, name: str) -> str:
    """The file's text (UTF-8, BOM dropped); a one-line error if it is unreadable or empty.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp, "run.csv")
        ...     _ = path.write_bytes(b"\\xef\\xbb\\xbfstep,loss\\n")
        ...     read_text(path, "run.csv")
        'step,loss\\n'
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReplayInputError(
            f"{name} byte {exc.start}: not UTF-8 text; save the file as UTF-8 or pass --format"
        ) from None
    except OSError as exc:
        raise ReplayInputError(f"{name}: cannot read ({exc.strerror}); check the path") from None
    if not text.strip():
        raise ReplayInputError(f"{name}: the file is empty; point at the file the run logged to")
    return text


def _blank(raw: object) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


@dataclass
class CurveBuilder:
    """Collects rows, checks steps increase and parses numbers, naming the source on error.

    Example:
        >>> build = CurveBuilder(name="run.csv", unit="line")
        >>> build.add("line 2", {"step": "1", "loss": "2.5", "grad_norm": "1.0"})
        >>> build.add("line 3", {"step": "2", "loss": "nan", "grad_norm": ""})
        >>> build.add("line 4", {"step": "2", "loss": ""})  # an eval row: dropped
        >>> curve = build.curve("run.csv", "csv", "add rows")
        >>> curve.loss, curve.grad_norm, curve.lr, curve.dropped
        ([2.5, nan], [1.0, None], None, {'no loss': 1})
    """

    name: str
    unit: str
    value_fix: str = ""
    """What to do about a value that is not a number (default: fix it or drop the row)."""
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float | None] = field(default_factory=list)
    lr: list[float | None] = field(default_factory=list)
    has: set[str] = field(default_factory=set)
    dropped: Counter[str] = field(default_factory=Counter)
    last_where: str = ""

    def fail(self, where: str, problem: str, fix: str) -> ReplayInputError:
        source = f"{self.name} {where}" if self.name else where
        return ReplayInputError(f"{source}: {problem}; {fix}")

    def drop(self, reason: str) -> None:
        """Count one row of the file that does not become a point, and why."""
        self.dropped[reason] += 1

    def number(self, where: str, key: str, raw: object) -> float | None:
        """``raw`` as a float; None for no value (blank cell, null, missing key)."""
        if _blank(raw):
            return None
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
        fix = self.value_fix or f"fix the value or remove the {self.unit}"
        raise self.fail(where, f"{key}={raw!r} is not a number", fix)

    def step(self, where: str, raw: object) -> int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        value = None if isinstance(raw, bool) else self.number(where, "step", raw)
        if value is None or not (math.isfinite(value) and value == int(value)):
            fix = self.value_fix or f"fix the value or remove the {self.unit}"
            raise self.fail(where, f"step={raw!r} is not a whole number", fix)
        return int(value)

    def add(self, where: str, row: Mapping[str, object]) -> None:
        """Append one row whose ``row`` maps roles (step, loss, ...) to raw values.

        A role missing from ``row`` is no value; a row with no loss is dropped (before
        its step is checked: eval rows often repeat the step of the training row).
        """
        for role in ("grad_norm", "lr"):
            if role in row:
                self.has.add(role)
        loss = self.number(where, "loss", row.get("loss"))
        if loss is None:
            self.drop(NO_LOSS)
            return
        step = self.step(where, row.get("step"))
        if self.steps and step <= self.steps[-1]:
            prev = f"step {self.steps[-1]} of {self.last_where}"
            if step == self.steps[-1]:
                raise self.fail(where, f"step {step} repeats {prev}", f"remove one {self.unit}")
            raise self.fail(
                where,
                f"step {step} comes after {prev} (steps must increase; was the run restarted?)",
                "sort by step, or keep only what was logged after the restart",
            )
        self.steps.append(step)
        self.loss.append(loss)
        self.grad_norm.append(self.number(where, "grad_norm", row.get("grad_norm")))
        self.lr.append(self.number(where, "lr", row.get("lr")))
        self.last_where = where

    def curve(self, path: str, fmt: str, empty_fix: str) -> Curve:
        if not self.steps:
            raise ReplayInputError(f"{self.name}: no {self.unit} has a loss value; {empty_fix}")
        return Curve(
            path=path,
            format=fmt,
            steps=self.steps,
            loss=self.loss,
            grad_norm=self.grad_norm if "grad_norm" in self.has else None,
            lr=self.lr if "lr" in self.has else None,
            dropped=dict(sorted(self.dropped.items())),
        )
