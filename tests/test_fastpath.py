"""The bulk path (`Monitor.observe_many`) must equal `observe` record by record, exactly."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CURVES
from spikewatch.monitor import Monitor
from spikewatch.records import StepRecord
from spikewatch.replay.readers import read_curve


def _assert_same(records: list[StepRecord], chunks: list[int]) -> int:
    fast, slow = Monitor(run="r"), Monitor(run="r")
    got, start = [], 0
    for size in chunks:
        got += fast.observe_many(records[start : start + size])
        start += size
    got += fast.observe_many(records[start:])
    want = [d for r in records for d in slow.observe(r)]
    assert got == want
    assert fast.state_dict() == slow.state_dict()
    assert [i.to_json() for i in fast.incidents] == [i.to_json() for i in slow.incidents]
    return len(want)


def _stream(
    seed: int, n: int, events: list[tuple[str, int]], grad_every: int, decimals: int | None = None
) -> list[StepRecord]:
    rng = random.Random(seed)
    out = []
    shift = 0.0
    for t in range(n):
        loss = 3.0 * (0.6 + 0.4 * 0.997**t) + rng.gauss(0, 0.02) + shift
        grad = 1.0 + abs(rng.gauss(0, 0.1))
        for kind, at in events:
            if kind == "spike" and t == at:
                loss += 1.5
                grad *= 30
            elif kind == "nan" and at <= t < at + 3:
                loss = math.nan
            elif kind == "shift" and t == at:
                shift += 1.0
            elif kind == "drift" and t >= at:
                loss += 0.004 * (t - at)
        if decimals is not None:  # a rounded log: the resolution floor decides the spread
            loss, grad = round(loss, decimals), round(grad, decimals)
        has_grad = grad_every and t % grad_every != 1
        out.append(StepRecord(run="r", step=t, loss=loss, grad_norm=grad if has_grad else None))
    return out


event = st.tuples(st.sampled_from(["spike", "nan", "shift", "drift"]), st.integers(0, 900))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    events=st.lists(event, max_size=5),
    chunks=st.lists(st.integers(1, 700), max_size=6),
    grad_every=st.sampled_from([0, 1, 7]),
    decimals=st.sampled_from([None, 4, 2, 1]),
)
def test_bulk_equals_streaming_on_any_stream(
    seed: int,
    events: list[tuple[str, int]],
    chunks: list[int],
    grad_every: int,
    decimals: int | None,
) -> None:
    _assert_same(_stream(seed, 1000, events, grad_every, decimals), chunks)


@pytest.mark.parametrize(
    "name",
    [
        "mng_scaleup_1p5b_20344.csv",
        "bng_gpt2_124m_gpt4tok_19073.csv",
        "hf_mistral7b_lora_sft_866.csv",
    ],
)
@pytest.mark.parametrize("decimals", [None, 2])
def test_bulk_equals_streaming_on_real_curves(name: str, decimals: int | None) -> None:
    curve = read_curve(CURVES / name)
    grads = curve.grad_norm

    def rounded(x: float | None) -> float | None:
        return x if x is None or decimals is None else round(x, decimals)

    records = [
        StepRecord(
            run="r",
            step=s,
            loss=v if decimals is None else round(v, decimals),
            grad_norm=None if grads is None else rounded(grads[i]),
        )
        for i, (s, v) in enumerate(zip(curve.steps, curve.loss, strict=True))
    ]
    decisions = _assert_same(records, [500] * (len(records) // 500))
    assert decisions > 0  # the curves have labelled spikes: the comparison covers signals


def _plateaus(seed: int) -> list[StepRecord]:
    """A 4-decimal log that repeats one value for hundreds of steps, then moves."""
    rng = random.Random(seed)
    loss = [0.0001] * 300 + [0.0002] * 200 + [0.0009] + [0.0002] * 99
    loss += [round(2e-4 + rng.gauss(0, 3e-5), 4) for _ in range(400)]
    grads = [0.25] * 400 + [round(0.25 + rng.gauss(0, 0.004), 2) for _ in range(600)]
    return [StepRecord(run="r", step=t, loss=x, grad_norm=g)
            for t, (x, g) in enumerate(zip(loss, grads, strict=True))]  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bulk_equals_streaming_on_plateaus_of_one_repeated_value(seed: int) -> None:
    # The resolution is unknown on a plateau: both paths fall back to its decimals.
    assert _assert_same(_plateaus(seed), [250, 300]) > 0


def test_bulk_equals_streaming_after_loading_a_state_saved_without_resolution() -> None:
    records = _stream(3, 800, [("spike", 500)], 1, decimals=4)
    fast, slow = Monitor(run="r"), Monitor(run="r")
    for r in records[:300]:
        slow.observe(r)
    state = json.loads(json.dumps(slow.state_dict()))
    for channel in ("loss", "grad_norm"):
        del state[channel]["spike"]["resolution"]  # a checkpoint from before the field
    fast.load_state_dict(state)
    slow.load_state_dict(state)
    got = fast.observe_many(records[300:])
    assert got == [d for r in records[300:] for d in slow.observe(r)]
    assert got and fast.state_dict() == slow.state_dict()
