"""From the probe's losses to a `Verdict`: robust statistics, no torch.

The reference batches set what "ordinary" is from the restored state: their median
loss, a robust spread (1.4826 x MAD, floored at 1 % of the median so that a handful of
near-identical references does not make every wobble an outlier) and their largest
value. A suspect batch is an outlier when it is far (``batch_z`` spreads) and large
(``batch_ratio`` x the median) above them, and above every reference: a data problem
the restored state finds hard.

Per-sample losses are heavy-tailed (a squared error is chi-square distributed; a
classifier on noisily labelled data pays 10x the median on 1 sample in 10), so samples
are measured on the log of the loss when every reference is positive (``sample_z``
spreads of log-loss: a small factor for a cross-entropy's narrow spread, a large one
for a squared error's wide one), and judged against the reference samples' own
record: where ordinary samples pass that test too, a suspect sample says nothing by
passing it, so the suspect batches must hold clearly more such samples than the
reference rate predicts (3 Poisson sigmas above it). Only samples beyond the highest
reference loss are named.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from spikewatch.forensics.verdict import Cause, ForensicsConfig, Verdict

_MAD_TO_SIGMA = 1.4826
_SPREAD_FLOOR = 0.01


@dataclass(frozen=True)
class BatchLoss:
    """One probed batch: its data position, mean loss, and per-sample losses if known.

    ``samples`` pairs each sample's dataset index (None when unknown) with its loss.
    """

    position: int
    loss: float
    samples: list[tuple[int | None, float]] = field(default_factory=list)


@dataclass(frozen=True)
class _Scale:
    median: float
    spread: float
    largest: float
    log: bool = False  # `spread` is of log(loss), `median` still of the loss

    @classmethod
    def of(cls, values: Sequence[float], *, log: bool = False) -> _Scale:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan, math.nan)
        med = statistics.median(finite)
        log = log and min(finite) > 0.0
        scaled = [math.log(v) for v in finite] if log else finite
        centre = statistics.median(scaled)
        mad = statistics.median(abs(v - centre) for v in scaled)
        floor = _SPREAD_FLOOR * (1.0 if log else abs(med))
        return cls(med, max(_MAD_TO_SIGMA * mad, floor, 1e-12), max(finite), log)

    def outlier(self, value: float, ratio: float, z: float, *, beyond: bool = True) -> bool:
        """Far and large above the median (and, with ``beyond``, above every reference)."""
        if not math.isfinite(value):
            return True  # a non-finite loss from the healthy state: the input did it
        if value < self.median * ratio or (beyond and value <= self.largest):
            return False
        distance = math.log(value / self.median) if self.log else value - self.median
        return distance / self.spread >= z


def judge(
    suspect: Sequence[BatchLoss],
    reference: Sequence[BatchLoss],
    config: ForensicsConfig,
    *,
    incident: str,
    step: int,
    onset_step: int,
) -> Verdict:
    """The verdict on a probe: ``data``, ``state`` or ``unknown``, with its numbers.

    Example:
        >>> ref = [BatchLoss(p, 2.0 + 0.01 * (p % 3)) for p in range(8)]
        >>> bad = [BatchLoss(10, 2.0), BatchLoss(11, 5.6, [(40, 2.0), (41, 9.0)])]
        >>> cfg = ForensicsConfig()
        >>> v = judge(bad, ref, cfg, incident="r:1", step=30, onset_step=10)
        >>> v.cause, v.outlier_positions
        ('data', [11])
        >>> v = judge([BatchLoss(10, 2.02), BatchLoss(11, 1.99)], ref, cfg,
        ...           incident="r:1", step=30, onset_step=10)
        >>> print(v.cause, v.why)  # doctest: +NORMALIZE_WHITESPACE
        state the 2 suspect batches look ordinary from the restored state (suspect median
        2.005 (max 2.02) vs reference 2.01 ± 0.02): the trouble was the model's state, not
        the data
    """
    positions = [b.position for b in suspect]
    if not suspect or len(reference) < config.min_reference:
        why = (
            f"too little to compare: {len(suspect)} suspect and {len(reference)} reference "
            f"batches probed (at least 1 and {config.min_reference} needed)"
        )
        return Verdict(
            cause="unknown", incident=incident, step=step, onset_step=onset_step,
            suspect_positions=positions, why=why,
        )  # fmt: skip
    batches = _Scale.of([b.loss for b in reference])
    ref_samples = [loss for b in reference for _, loss in b.samples]
    enough = len(ref_samples) >= 2 * config.min_reference
    samples = _Scale.of(ref_samples, log=True) if enough else None
    outliers = [
        b.position for b in suspect if batches.outlier(b.loss, config.batch_ratio, config.batch_z)
    ]
    named = [] if samples is None else _outlying_samples(suspect, ref_samples, samples, config)
    suspect_loss = statistics.median([b.loss for b in suspect])
    worst = max(b.loss for b in suspect)
    numbers = (
        f"suspect median {suspect_loss:.4g} (max {worst:.4g}) vs reference "
        f"{batches.median:.4g} ± {batches.spread:.2g}"
    )
    cause: Cause
    if outliers or named:
        cause = "data"
        why = (
            f"{len(outliers)} of {len(suspect)} suspect batches and {len(named)} samples stand "
            f"out even from the restored state ({numbers}): bad data"
        )
    elif suspect_loss <= batches.median * config.state_ratio:
        cause = "state"
        why = (
            f"the {len(suspect)} suspect batches look ordinary from the restored state "
            f"({numbers}): the trouble was the model's state, not the data"
        )
    else:
        cause = "unknown"
        why = f"the suspect batches are somewhat above the reference, not clearly ({numbers})"
    return Verdict(
        cause=cause,
        suspect_positions=positions,
        outlier_positions=outliers if cause == "data" else [],
        suspect_loss=suspect_loss,
        reference_loss=batches.median,
        samples=named,
        why=why,
        incident=incident,
        step=step,
        onset_step=onset_step,
    )


def _outlying_samples(
    suspect: Sequence[BatchLoss],
    reference: Sequence[float],
    scale: _Scale,
    config: ForensicsConfig,
) -> list[dict[str, object]]:
    """The suspect samples that stand out (module docstring: the reference's record).

    Example:
        >>> cfg = ForensicsConfig()
        >>> light = [2.0 + 0.01 * (i % 5) for i in range(40)]  # no reference sample passes
        >>> bad = [BatchLoss(9, 3.0, [(1, 2.02), (2, 7.5)])]
        >>> [s["index"] for s in _outlying_samples(bad, light, _Scale.of(light), cfg)]
        [2]
        >>> heavy = light[:36] + [9.0, 12.0, 15.0, 20.0]  # 1 in 10 passes: ordinary
        >>> _outlying_samples(bad, heavy, _Scale.of(heavy), cfg)
        []
    """

    def passes(loss: float) -> bool:  # not "beyond every reference": that is for naming
        return scale.outlier(loss, config.sample_ratio, config.sample_z, beyond=False)

    found: list[dict[str, object]] = [
        {"position": b.position, "index": index, "loss": loss}
        for b in suspect
        for index, loss in b.samples
        if passes(loss)
    ]
    ordinary = sum(passes(v) for v in reference)
    if ordinary and found:
        total = sum(len(b.samples) for b in suspect)
        expected = ordinary / len(reference) * total
        if len(found) < expected + 3.0 * math.sqrt(expected) + 1.0:
            return []  # no more than ordinary samples would give
    return [s for s in found if not _loss(s) <= scale.largest]  # NaN: named (the input did it)


def _loss(sample: dict[str, object]) -> float:
    loss = sample["loss"]
    return float(loss) if isinstance(loss, int | float) else math.nan
