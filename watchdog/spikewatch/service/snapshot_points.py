"""Where in a batch the service snapshots a run's detectors: at the trainer's boundaries.

A trainer snapshots its weights every ``snapshot_every`` steps (`SpikeGuard`'s default,
100, is the service's too) and, after a rollback, continues at one of those steps
(``rewind_to``). The service's detectors then rewind to the newest snapshot taken
*before* that step; one taken exactly after step ``k * every - 1`` makes that rewind
exact. A batch is cut at every such boundary it crosses, whatever its size or timing
(only the newest ``keep`` of a long batch: the trainer's ring cannot reach further).
"""

from __future__ import annotations

from bisect import bisect_left


def snapshot_points(
    last: int | None, steps: list[int], *, every: int, keep: int
) -> list[tuple[int, int]]:
    """``(index, step)`` pairs: snapshot the detectors before ``steps[index]`` (``index``
    may be ``len(steps)``: after the batch), labelled with the last step they include.

    ``last`` is the newest step observed before the batch (None for a new run).

    Example:
        >>> snapshot_points(None, list(range(0, 250)), every=100, keep=8)
        [(100, 99), (200, 199)]
        >>> snapshot_points(195, [196, 197, 198, 199], every=100, keep=8)  # ends on one
        [(4, 199)]
        >>> snapshot_points(98, [105, 106], every=100, keep=8)  # crossed between batches
        [(0, 98)]
        >>> snapshot_points(10, [11, 12], every=100, keep=8)
        []
        >>> snapshot_points(None, list(range(1000)), every=100, keep=2)
        [(900, 899), (1000, 999)]
    """
    if not steps:
        return []
    points: dict[int, int] = {}
    # Every multiple m of ``every`` after the last step observed, up to the batch's
    # last step: cut before the first step >= m.
    seen = steps[0] if last is None else last
    start = (seen // every + 1) * every
    newest = -(-(steps[-1] - every * keep + 1) // every) * every  # only the last ``keep``
    for m in range(max(start, newest), steps[-1] + 1, every):
        index = bisect_left(steps, m)
        label = steps[index - 1] if index > 0 else last
        if label is not None:
            points[index] = label
    if (steps[-1] + 1) % every == 0:  # the batch ends on a boundary
        points[len(steps)] = steps[-1]
    return sorted(points.items())[-keep:]
