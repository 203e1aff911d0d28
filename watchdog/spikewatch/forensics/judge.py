"""From the probe's losses to a `Verdict`: robust statistics, no torch.

The reference batches set what "ordinary" is from the restored state: their median
loss and a robust spread (1.4826 x MAD, floored at 1 % of the median so that a handful
of near-identical references does not make every wobble an outlier). A suspect batch
or sample is an outlier only when it is both far (``*_z`` spreads) and large
(``*_ratio`` x the median) above it: a data problem the restored state finds hard.

Samples are judged against the reference samples' own record: where ordinary samples
pass that test too (heavy-tailed per-sample losses, such as a classifier's on noisily
labelled data, where 1 sample in 10 can cost 10x the median), a suspect sample says
nothing by passing it. Then the suspect batches must hold clearly more such samples
than the reference rate predicts (3 Poisson sigmas above it), and only those beyond
the highest reference loss are named.
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

    @classmethod
    def of(cls, values: Sequence[float]) -> _Scale:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan)
        med = statistics.median(finite)
        mad = statistics.median(abs(v - med) for v in finite)
        return cls(med, max(_MAD_TO_SIGMA * mad, _SPREAD_FLOOR * abs(med), 1e-12))

    def outlier(self, value: float, ratio: float, z: float) -> bool:
        if not math.isfinite(value):
            return True  # a non-finite loss from the healthy state: the input did it
        return value >= self.median * ratio and (value - self.median) / self.spread >= z


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
    samples = _Scale.of(ref_samples) if len(ref_samples) >= 2 * config.min_reference else None
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

    def passes(loss: float) -> bool:
        return scale.outlier(loss, config.sample_ratio, config.sample_z)

    found: list[dict[str, object]] = [
        {"position": b.position, "index": index, "loss": loss}
        for b in suspect
        for index, loss in b.samples
        if passes(loss)
    ]
    ordinary = sum(passes(v) for v in reference)
    if not ordinary or not found:
        return found
    total = sum(len(b.samples) for b in suspect)
    expected = ordinary / len(reference) * total
    if len(found) < expected + 3.0 * math.sqrt(expected) + 1.0:
        return []  # no more than ordinary samples would give
    highest = max((v for v in reference if math.isfinite(v)), default=math.inf)
    return [s for s in found if not _loss(s) <= highest]  # NaN: named (the input did it)


def _loss(sample: dict[str, object]) -> float:
    loss = sample["loss"]
    return float(loss) if isinstance(loss, int | float) else math.nan
