"""CSV/TSV curves: a header naming the columns, one logged step per row (W&B exports too)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from spikewatch.errors import ReplayInputError
from spikewatch.replay.formats import wandb
from spikewatch.replay.formats.builder import ALIASES, ROLES, CurveBuilder, pick, read_text
from spikewatch.replay.model import Curve


def header_roles(header: Sequence[str], *, where: str) -> dict[str, int]:
    """Column index of each role (step, loss, grad_norm, lr) found in ``header``.

    Example:
        >>> header_roles(["Step", "r - train/loss", "r - train/loss__MAX"], where="x.csv")
        {'step': 0, 'loss': 1}
    """
    names = wandb.metric_names(header, where=where)
    roles = {role: pick([n for n in names if n], role) for role in ROLES}
    return {role: names.index(name) for role, name in roles.items() if name is not None}


def read_csv(path: Path, name: str) -> Curve:
    """Read a CSV or TSV curve; the format is ``"wandb"`` for a W&B export.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp, "export.csv")
        ...     _ = path.write_text(",_step,train/loss,train/grad_norm,_runtime\\n"
        ...                         "0,0,2.5,1.0,1.2\\n1,1,2.4,,2.3\\n2,2,,,2.4\\n")
        ...     curve = read_csv(path, str(path))
        >>> curve.format, curve.steps, curve.grad_norm, curve.dropped
        ('wandb', [0, 1], [1.0, None], {'no loss': 1})
    """
    lines = read_text(path, name).splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip())
    delimiter = "\t" if "\t" in lines[first] and "," not in lines[first] else ","
    reader = csv.reader(lines[first:], delimiter=delimiter)
    header = next(reader)
    index = header_roles(header, where=f"{name} line {first + 1}")
    for role in ("step", "loss"):
        if role not in index:
            raise ReplayInputError(
                f"{name} line {first + 1}: no {role} column in header {delimiter.join(header)!r}; "
                f"name a column {' or '.join(ALIASES[role][:3])}"
            )
    build = CurveBuilder(name=name, unit="line")
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue  # a blank line is layout, not a dropped row
        values = {role: cells[i].strip() if i < len(cells) else "" for role, i in index.items()}
        build.add(f"line {first + reader.line_num}", values)
    fmt = "wandb" if wandb.is_wandb(header) else "csv"
    return build.curve(str(path), fmt, "add rows below the header, e.g. 1,2.31")
