"""Tests of the detection benchmark: its scoring rules, the baseline rules, the issue's targets."""

from __future__ import annotations

import doctest
import json
import math
import subprocess
import sys
from types import ModuleType

import pytest

from conftest import CURVES, REPO

BENCH = REPO / "bench"
if str(BENCH) not in sys.path:  # bench/ holds scripts, not a package (mypy_path lists it)
    sys.path.append(str(BENCH))

import baselines  # noqa: E402
import scoring  # noqa: E402
from baselines import (  # noqa: E402
    BASELINES,
    Baseline,
    LightningSpikeDetection,
    LlmFoundryKillLossSpike,
    OlmoCoreSkipStep,
    OlmoCoreStabilityMonitor,
)
from scoring import CurveLabels, CurveScore, score_curve, summarize  # noqa: E402

NAN = float("nan")


@pytest.mark.parametrize("module", [baselines, scoring], ids=lambda m: m.__name__)
def test_docstring_examples(module: ModuleType) -> None:
    # bench/ is outside pytest's doctest paths in pyproject, so its examples are run here.
    results = doctest.testmod(module)
    assert results.attempted > 0
    assert results.failed == 0


def alarms(detector: Baseline, stream: list[float]) -> list[int]:
    """Indices where ``detector.update`` returned True."""
    return [t for t, x in enumerate(stream) if detector.update(x)]


def one_span(start: int, end: int, *borderline: int) -> CurveLabels:
    return CurveLabels(spans=((start, end),), borderline=frozenset(borderline))


# -- scoring --------------------------------------------------------------------------


def test_alarm_one_step_after_a_span_is_a_hit() -> None:
    score = score_curve(one_span(10, 10), [11], steps=range(30))
    assert (score.hits, score.true_alarms, score.false_alarms, score.delays) == (1, 1, 0, (1,))


def test_late_alarm_inside_a_long_span_is_a_hit_with_its_delay() -> None:
    score = score_curve(one_span(10, 12), [13], steps=range(30))
    assert (score.hits, score.delays, score.false_alarms) == (1, (3,), 0)


def test_alarm_two_steps_after_a_span_is_a_miss_and_a_false_alarm() -> None:
    score = score_curve(one_span(10, 10), [12], steps=range(30))
    assert (score.hits, score.true_alarms, score.false_alarms) == (0, 0, 1)
    summary = summarize([score])
    assert (summary.precision, summary.recall, summary.f1) == (0.0, 0.0, 0.0)
    assert summary.median_delay is None


def test_window_reaches_the_next_logged_step_on_a_sparse_curve() -> None:
    score = score_curve(one_span(20, 20), [30], steps=[0, 10, 20, 30, 40])
    assert (score.hits, score.delays) == (1, (10,))


def test_borderline_alarm_is_not_counted() -> None:
    score = score_curve(one_span(10, 10, 20), [20], steps=range(30))
    assert (score.true_alarms, score.false_alarms, score.borderline_alarms) == (0, 0, 1)
    assert summarize([score]).precision is None


def test_consecutive_alarms_are_merged_into_one() -> None:
    score = score_curve(one_span(10, 10), [10, 11, 12, 15, 16, 17], steps=range(30))
    assert (score.hits, score.true_alarms, score.false_alarms, score.delays) == (1, 1, 1, (0,))


def test_adjacency_follows_logged_points_not_step_numbers() -> None:
    steps = [0, 10, 20, 30, 40]
    assert score_curve(CurveLabels(spans=()), [10, 20], steps).false_alarms == 1
    assert score_curve(CurveLabels(spans=()), [10, 30], steps).false_alarms == 2


def test_false_alarm_rate_counts_clean_curves_only() -> None:
    clean_a = score_curve(CurveLabels(spans=()), [100], steps=range(5_000))
    clean_b = score_curve(CurveLabels(spans=()), [10, 20], steps=range(15_000))
    spiky = score_curve(one_span(50, 50), [50, 70, 90], steps=range(10_000))
    summary = summarize([clean_a, clean_b, spiky])
    assert summary.false_alarms_per_10k == pytest.approx(1.5)
    assert summary.precision == pytest.approx(1 / 6)
    assert summary.recall == 1.0


def test_pooled_rates_are_exact() -> None:
    a = CurveScore(
        100, spans=4, hits=3, true_alarms=3, false_alarms=1, borderline_alarms=2, delays=(0, 0, 2)
    )
    b = CurveScore(
        100, spans=1, hits=1, true_alarms=1, false_alarms=0, borderline_alarms=0, delays=(5,)
    )
    summary = summarize([a, b])
    assert (summary.precision, summary.recall) == (0.8, 0.8)
    assert summary.f1 == pytest.approx(0.8)
    assert summary.median_delay == 1.0
    assert summary.false_alarms_per_10k is None  # no clean curve


# -- baselines ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_constant_stream_never_alarms(name: str) -> None:
    assert alarms(BASELINES[name](500), [2.5] * 500) == []


def test_llm_foundry_alarms_on_the_fifth_outlier_in_a_row() -> None:
    stream = [1.0] * 10 + [6.0] * 6 + [1.0]
    assert alarms(LlmFoundryKillLossSpike(window_size=10), stream) == [14]


def test_llm_foundry_resets_after_four_outliers() -> None:
    stream = [1.0] * 10 + [6.0] * 4 + [1.0] + [6.0] * 4
    assert alarms(LlmFoundryKillLossSpike(window_size=10), stream) == []


def test_llm_foundry_waits_for_the_widened_window() -> None:
    stream = [1.0] * 10 + [50.0] * 10  # 5% of 400 points: a window of 20, never full here
    assert alarms(LlmFoundryKillLossSpike(window_size=10, total_points=400), stream) == []
    # 5th outlier at 14; at 19 (step 2 x window) the high-loss rule sees 9 values above 10
    assert alarms(LlmFoundryKillLossSpike(window_size=10), stream) == [14, 19]


def test_llm_foundry_high_loss_rule() -> None:
    stream = [9.0] * 8 + [11.0] * 4  # half the window above the cap of 10, after 2 windows
    assert alarms(LlmFoundryKillLossSpike(window_size=4), stream) == [10, 11]


def test_olmo_core_skip_step_warm_up_is_64_values() -> None:
    calm = [1.0, 1.1] * 31
    assert alarms(OlmoCoreSkipStep(), [*calm, 100.0]) == []  # 63rd value
    assert alarms(OlmoCoreSkipStep(), [*calm, 1.0, 100.0]) == [63]


def test_olmo_core_skip_step_keeps_spikes_in_its_history() -> None:
    calm = [1.0, 1.1] * 20
    assert alarms(OlmoCoreSkipStep(rolling_interval_length=40), [*calm, 1.0, 1.0, 1.6]) == [42]
    assert alarms(OlmoCoreSkipStep(rolling_interval_length=40), [*calm, 2.0, 1.0, 1.6]) == [40]


def test_olmo_core_skip_step_skips_nan() -> None:
    assert alarms(OlmoCoreSkipStep(rolling_interval_length=40), [1.0, 1.1] * 20 + [NAN]) == [40]


def test_olmo_core_monitor_needs_a_full_window_and_nonzero_std() -> None:
    stream = [1.0, 2.0, 1.0, 2.0, 5.0, 1.0, 2.0, 9.0]
    assert alarms(OlmoCoreStabilityMonitor(window_size=4, threshold_std=2.0), stream) == [4, 7]
    assert alarms(OlmoCoreStabilityMonitor(window_size=4), [1.0] * 4 + [9.0]) == []


def test_lightning_default_rule() -> None:
    det = LightningSpikeDetection(window=3)
    stream = [1.0, 1.1, 0.9, 3.5, 1.0, 2.9, 3.1, NAN]
    assert alarms(det, stream) == [3, 7]
    assert det.bad_batches == [2, 3, 6, 7]


def test_lightning_warmup_improvement_and_atol() -> None:
    assert alarms(LightningSpikeDetection(), [1.0, 5.0]) == [1]  # |5 - 1| >= 2 x 1
    assert alarms(LightningSpikeDetection(warmup=2), [1.0, 5.0]) == []
    assert alarms(LightningSpikeDetection(), [1.0, 4.0, 1.0, 5.0, 2.0, 0.5]) == [1, 3]
    strict = LightningSpikeDetection(atol=5.0)  # both tolerances must be exceeded
    assert alarms(strict, [1.0, 1.0, 5.0, 9.0]) == [3]


def test_lightning_finite_only_false_ignores_nan() -> None:
    det = LightningSpikeDetection(finite_only=False)
    assert alarms(det, [1.0, NAN, 1.0, 4.0]) == [3]


# -- the issue's acceptance criteria ---------------------------------------------------


def test_the_labelled_curves_ship_with_the_repository() -> None:
    labels = json.loads((CURVES / "labels.json").read_text(encoding="utf-8"))
    assert {p.stem for p in CURVES.glob("*.csv")} == set(labels)
    assert len(labels) == 16
    assert (CURVES / "SOURCES.md").is_file()


# Guards the issues' acceptance criteria: spikewatch must beat every framework baseline on
# the real labelled curves, take no rollback on them, raw or rounded to 4 or 2 decimals
# (as the HF Trainer and llm.c print them), and replay the 20k-step curve in < 2 s.
def test_benchmark_meets_the_issue_targets() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "detection.py"), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    ours, baselines = result["ours"], result["baselines"]
    assert ours["recall"] >= 0.95
    assert ours["false_alarms_per_10k"] <= min(
        b["false_alarms_per_10k"] for b in baselines.values()
    )
    assert all(ours["f1"] > b["f1"] for b in baselines.values()), (ours, baselines)
    assert ours["rollbacks"] == 0
    assert set(result["rounded"]) == {"4", "2"}
    for decimals, rounded in result["rounded"].items():
        assert rounded["rollbacks"] == 0, decimals
        assert rounded["recall"] >= 0.95, decimals  # measured: 0.994 (4), 0.977 (2)
    assert all(
        row[v]["rollbacks"] == 0 for row in result["rounded_per_curve"].values() for v in "42"
    )
    replay = result["replay_seconds_20344"]
    assert replay is not None, "spikewatch replay failed; see the note on stderr"
    # The figure itself (≈1–2 s) is the benchmark's to report; a unit test on a shared
    # host only catches a pathological slowdown (an O(n²) replay would take minutes).
    assert replay < 30.0
    assert math.isfinite(result["detector_update_median_us"])
    assert set(result["per_curve"]) == {p.stem for p in CURVES.glob("*.csv")}
