"""Fit the rollback settings to the length of the run, when the run length is known.

The defaults (``margin=100``, ``skip_ahead=100``, ``snapshot_every=100``) suit runs of
thousands of steps. On a 300-step run one rollback could undo two thirds of the run and
pass over a hundred more batches. When a hook knows the run length (SpikeGuard's
``total_steps=``, Lightning's ``max_steps`` / ``estimated_stepping_batches``, HF's
``max_steps``), it calls `fit_to_run_length` before it builds its engine:

- a setting left at its default **adapts** to the run: one rollback then undoes at most
  about ``share`` of the run, and skips at most ``share`` of it ahead (logged once);
- a setting the user gave explicitly is kept; when one rollback could undo, or skip
  ahead, more than twice that share (20 % by default) the hook **warns**
  (`RunLengthWarning`) with the numbers and the values to pass instead.

Units: every setting here counts optimizer steps (``skip_ahead`` becomes batches with
the run's batches per optimizer step, see `GuardEngine.batches_per_step`).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, replace

from spikewatch.validation import check_int
from spikewatch_hooks.core.options import GuardOptions

log = logging.getLogger("spikewatch_hooks")

#: One rollback may undo, and skip ahead, at most about this share of a known-length run.
SHARE = 0.1


class RunLengthWarning(UserWarning):
    """Explicit rollback settings that would undo or skip a large share of a short run."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunLengthCheck:
    """What `check_run_length` found.

    Attributes:
        total_steps: the run length in optimizer steps.
        budget: the steps one rollback may undo (and skip ahead): ``share`` of the run.
        margin, skip_ahead, snapshot_every: settings that fit the budget (each at most
            the value checked).
        problems: one line per setting out of proportion (over twice the budget), with
            the numbers and the fix.
    """

    total_steps: int
    budget: int
    margin: int
    skip_ahead: int
    snapshot_every: int
    problems: tuple[str, ...]


def check_run_length(
    total_steps: int,
    *,
    margin: int,
    skip_ahead: int,
    snapshot_every: int,
    keep_snapshots: int,
    share: float = SHARE,
) -> RunLengthCheck:
    """Check the rollback settings against a run of ``total_steps`` optimizer steps.

    A rollback restores the newest snapshot at least ``margin`` steps before the onset:
    up to ``margin + snapshot_every`` steps before it. Suggested values keep that, and
    ``skip_ahead``, within ``share`` of the run, and keep ``keep_snapshots`` snapshots
    reaching back past the margin.

    Example:
        >>> check = check_run_length(300, margin=100, skip_ahead=100, snapshot_every=100,
        ...                          keep_snapshots=4)
        >>> check.budget, check.margin, check.skip_ahead, check.snapshot_every
        (30, 15, 30, 11)
        >>> print(check.problems[0])
        margin=100 with snapshot_every=100 can roll back 200 of the run's 300 steps (67%):
        pass margin=15, snapshot_every=11
        >>> check_run_length(10_000, margin=100, skip_ahead=100, snapshot_every=100,
        ...                  keep_snapshots=4).problems
        ()
    """
    total = check_int("total_steps", total_steps, minimum=1)
    budget = max(1, int(total * share))
    fit_margin = min(margin, max(1, budget // 2))
    fit_ahead = min(skip_ahead, budget)
    # keep_snapshots snapshots must reach back past the margin plus the detection delay.
    fit_every = min(snapshot_every, max(1, (fit_margin + budget) // max(keep_snapshots, 1)))
    problems = []
    if margin + snapshot_every > 2 * budget:
        back = margin + snapshot_every
        problems.append(
            f"margin={margin} with snapshot_every={snapshot_every} can roll back {back} of "
            f"the run's {total} steps ({min(back, total) / total:.0%}): pass "
            f"margin={fit_margin}, snapshot_every={fit_every}"
        )
    if skip_ahead > 2 * budget:
        problems.append(
            f"skip_ahead={skip_ahead} skips {skip_ahead} of the run's {total} steps of data "
            f"after each rollback ({min(skip_ahead, total) / total:.0%}): pass "
            f"skip_ahead={fit_ahead} (PolicyConfig)"
        )
    return RunLengthCheck(
        total_steps=total,
        budget=budget,
        margin=fit_margin,
        skip_ahead=fit_ahead,
        snapshot_every=fit_every,
        problems=tuple(problems),
    )


def fit_to_run_length(
    options: GuardOptions,
    total_steps: int | float | None,
    *,
    share: float = SHARE,
) -> GuardOptions:
    """Adapt the default rollback settings to a known run length; warn about given ones.

    Call it before the engine is built. ``total_steps`` None or infinite (unknown
    length) returns ``options`` unchanged. ``snapshot_every`` adapts unless the user
    passed it (``options.snapshot_given``). ``margin`` counts as given when passed on
    its own or in ``config=``; ``skip_ahead`` when ``config=`` was passed.

    Example:
        >>> opts = GuardOptions.build(run_id="short")
        >>> fitted = fit_to_run_length(opts, 300)
        >>> p = fitted.config.policy
        >>> p.margin, p.skip_ahead, fitted.snapshot_every
        (15, 30, 11)
        >>> fit_to_run_length(opts, None) is opts
        True
    """
    if total_steps is None or not math.isfinite(total_steps):
        return options
    policy = options.config.policy
    check = check_run_length(
        int(total_steps),
        margin=policy.margin,
        skip_ahead=policy.skip_ahead,
        snapshot_every=options.snapshot_every,
        keep_snapshots=options.keep_snapshots,
        share=share,
    )
    margin_given = options.explicit or options.margin is not None
    fitted = replace(
        policy,
        margin=policy.margin if margin_given else check.margin,
        skip_ahead=policy.skip_ahead if options.explicit else check.skip_ahead,
    )
    every = options.snapshot_every if options.snapshot_given else check.snapshot_every
    if (fitted, every) != (policy, options.snapshot_every):
        log.warning(
            "spikewatch: a %d-step run: margin %d, skip_ahead %d, snapshot_every %d "
            "(defaults fitted to the run; pass them explicitly to choose)",
            check.total_steps, fitted.margin, fitted.skip_ahead, every,
        )  # fmt: skip
    left = check_run_length(
        check.total_steps,
        margin=fitted.margin,
        skip_ahead=fitted.skip_ahead,
        snapshot_every=every,
        keep_snapshots=options.keep_snapshots,
        share=share,
    )
    for problem in left.problems:
        warnings.warn(f"spikewatch: {problem}", RunLengthWarning, stacklevel=3)
    config = replace(options.config, policy=fitted)
    return replace(options, config=config, snapshot_every=every)
