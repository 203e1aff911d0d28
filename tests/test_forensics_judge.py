"""`judge` on seeded per-sample losses: light tails (a language model's per-sample mean
loss) and heavy tails (a classifier's cross-entropy on noisily labelled data)."""

from __future__ import annotations

import random

import pytest

from spikewatch.forensics.judge import BatchLoss, judge
from spikewatch.forensics.verdict import ForensicsConfig, Verdict

BATCH = 64


def batches(
    draw: random.Random,
    first: int,
    count: int,
    *,
    heavy: bool,
    bad: frozenset[int] | set[int] = frozenset(),
) -> list[BatchLoss]:
    """``count`` batches from data position ``first``; sample ``i`` of position ``p`` has
    dataset index ``p * BATCH + i``; indices in ``bad`` cost 10x."""
    out = []
    for p in range(first, first + count):
        samples: list[tuple[int | None, float]] = []
        for i in range(p * BATCH, (p + 1) * BATCH):
            loss = sample_loss(draw, heavy=heavy)
            samples.append((i, loss * (10.0 if i in bad else 1.0)))
        out.append(BatchLoss(p, sum(v for _, v in samples) / BATCH, samples))
    return out


def sample_loss(draw: random.Random, *, heavy: bool) -> float:
    if not heavy:
        return draw.gauss(2.0, 0.05)
    if draw.random() < 0.2:  # an unlikely label: ~20x the median loss
        return draw.expovariate(1 / 2.0)
    return draw.uniform(0.05, 0.15)


def verdict_on(suspect: list[BatchLoss], reference: list[BatchLoss]) -> Verdict:
    return judge(suspect, reference, ForensicsConfig(), incident="r:1", step=30, onset_step=20)


@pytest.mark.parametrize("heavy", [False, True], ids=["light", "heavy"])
def test_ordinary_suspect_batches_are_the_state(heavy: bool) -> None:
    draw = random.Random(0)
    reference = batches(draw, 0, 8, heavy=heavy)
    verdict = verdict_on(batches(draw, 20, 16, heavy=heavy), reference)
    assert (verdict.cause, verdict.samples) == ("state", [])


@pytest.mark.parametrize("heavy", [False, True], ids=["light", "heavy"])
def test_bad_samples_are_data_and_only_bad_ones_are_named(heavy: bool) -> None:
    draw = random.Random(1)
    bad = set(range(22 * BATCH + 5, 30 * BATCH + 5))  # mid-batch to mid-batch
    reference = batches(draw, 0, 8, heavy=heavy)
    verdict = verdict_on(batches(draw, 20, 16, heavy=heavy, bad=bad), reference)
    named = {s["index"] for s in verdict.samples}
    assert verdict.cause == "data"
    assert named <= bad  # precision 1: heavy tails' ordinary hard samples are not named
    # Heavy tails: only bad samples beyond every reference one are named (of these, the
    # ~1 in 5 that were hard already); the 10x on an easy sample hides among hard ones.
    assert len(named) >= (0.99 if not heavy else 0.1) * len(bad)


def test_one_bad_sample_among_light_tailed_ones_is_named() -> None:
    draw = random.Random(2)
    verdict = verdict_on(batches(draw, 20, 4, heavy=False, bad={20 * BATCH + 7}),
                         batches(draw, 0, 8, heavy=False))  # fmt: skip
    assert verdict.cause == "data" and [s["index"] for s in verdict.samples] == [20 * BATCH + 7]
