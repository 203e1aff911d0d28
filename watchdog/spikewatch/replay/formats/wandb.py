"""The column names of W&B CSV exports, mapped to the metric names they hold.

W&B writes two shapes of CSV:

* a run's history (``run.history().to_csv()`` or the run page's export): one column per
  logged key (``train/loss``, ``train/grad_norm``, ...) plus ``_step``, ``_runtime`` and
  ``_timestamp``; the plain aliases read these.
* a chart export from the UI: ``Step,<run> - train/loss,<run> - train/loss__MIN,
  <run> - train/loss__MAX`` (one group per run shown). ``__MIN``/``__MAX`` are the
  band of a smoothed or sampled line, not the metric, so they are never read.
"""

from __future__ import annotations

from collections.abc import Sequence

from spikewatch.errors import ReplayInputError

#: Keys W&B adds to every history row; one of them marks a history export.
HISTORY_KEYS = ("_step", "_runtime", "_timestamp")
_BAND_SUFFIXES = ("__MIN", "__MAX")
_RUN_SEPARATOR = " - "


def is_chart_export(header: Sequence[str]) -> bool:
    """True for the W&B UI's chart export: every column after the first is ``<run> - key``.

    Example:
        >>> is_chart_export(["Step", "lr-3e-4 - train/loss", "lr-3e-4 - train/loss__MIN"])
        True
        >>> is_chart_export(["step", "loss"])
        False
    """
    return len(header) > 1 and all(_RUN_SEPARATOR in column for column in header[1:])


def is_wandb(header: Sequence[str]) -> bool:
    """True for either W&B export shape (history or chart).

    Example:
        >>> is_wandb(["", "_step", "train/loss", "_runtime"]), is_wandb(["step", "loss"])
        (True, False)
    """
    names = {column.strip() for column in header}
    return is_chart_export(header) or any(key in names for key in HISTORY_KEYS)


def metric_names(header: Sequence[str], *, where: str) -> list[str]:
    """The metric each column holds: the run prefix of a chart export dropped, ``""``
    for ``__MIN``/``__MAX`` columns (so no alias ever matches them).

    Raises:
        ReplayInputError: a chart export holds more than one run, whose curves would
            interleave into one.

    Example:
        >>> metric_names(["Step", "a - train/loss", "a - train/loss__MIN"], where="x.csv")
        ['Step', 'train/loss', '']
    """
    if not is_chart_export(header):
        return list(header)
    runs: list[str] = []
    names = [header[0]]
    for column in header[1:]:
        run, _, metric = column.strip().rpartition(_RUN_SEPARATOR)
        if run not in runs:
            runs.append(run)
        names.append("" if metric.endswith(_BAND_SUFFIXES) else metric)
    if len(runs) > 1:
        shown = ", ".join(repr(r) for r in runs[:4]) + (", ..." if len(runs) > 4 else "")
        raise ReplayInputError(
            f"{where}: a W&B chart export of {len(runs)} runs ({shown}); export the chart "
            "with one run shown, or keep only the Step column and one run's columns"
        )
    return names
