"""Detection benchmark: spikewatch against three frameworks' spike rules on labelled curves.

Run ``python bench/detection.py [--curves DIR] [--json]``. DIR holds ``*.csv`` curves and
``labels.json`` (default: ``bench/curves``, shipped with the repository; see its SOURCES.md).
Every detector sees each curve's logged losses once, in order; `scoring` explains how alarms
are counted. "Ours" is the full replay pipeline (`spikewatch.replay.analyze.analyze`): its
alarms are the ``detected_step`` of its loss events, and its ``rollback`` actions are
counted as well. Ours also replays *rounded* variants of every curve (loss and grad norm
rounded to 4 and to 2 decimals, as the HF Trainer and llm.c print them), scored against
the same labels: logs that coarse must not cost a rollback.
The run ends with timings: the ``spikewatch replay --json`` command end to end, one
`RobustSpikeDetector.update` call, and the pipeline per logged record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from baselines import BASELINES, BaselineFactory
from scoring import CurveLabels, CurveScore, score_curve, summarize
from spikewatch.detectors.robust import RobustSpikeDetector

if TYPE_CHECKING:
    from spikewatch.replay.model import Curve

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CURVES = REPO_ROOT / "bench" / "curves"
TIMING_CURVE = "mng_scaleup_1p5b_20344"
OURS = "ours"
#: Decimals of the rounded variants: the HF Trainer logs 4, llm.c prints the grad norm with 2.
ROUNDINGS = (4, 2)


@dataclass(frozen=True)
class LabelledCurve:
    """One benchmark curve: its name (file stem), data and ground truth."""

    name: str
    curve: Curve
    labels: CurveLabels


@dataclass(frozen=True)
class Run:
    """What one detector did on one curve."""

    score: CurveScore
    rollbacks: int | None
    """Rollback actions taken (None for a baseline, which has no policy)."""


def load_curves(curves_dir: Path) -> list[LabelledCurve]:
    """Read every labelled CSV in ``curves_dir`` (unlabelled ones are skipped with a note)."""
    # Lazy, like `analyze` below: --help must work without the replay pipeline.
    from spikewatch.replay.readers import read_curve  # noqa: PLC0415

    labels = json.loads((curves_dir / "labels.json").read_text(encoding="utf-8"))
    curves = []
    for path in sorted(curves_dir.glob("*.csv")):
        entry = labels.get(path.stem)
        if entry is None:
            print(f"note: {path.name} has no entry in labels.json; skipped", file=sys.stderr)
            continue
        truth = CurveLabels(
            spans=tuple((int(s), int(e)) for s, e in entry["spikes"]),
            borderline=frozenset(int(b) for b in entry.get("borderline_steps", [])),
        )
        curves.append(LabelledCurve(path.stem, read_curve(path), truth))
    return curves


def rounded(item: LabelledCurve, decimals: int) -> LabelledCurve:
    """The curve as a log printed with ``decimals`` decimals would hold it (same labels)."""

    def fix(values: Sequence[float | None]) -> list[float | None]:
        return [None if v is None else round(v, decimals) for v in values]

    curve = item.curve
    changes: dict[str, Any] = {"loss": [round(v, decimals) for v in curve.loss]}
    if curve.grad_norm is not None:
        changes["grad_norm"] = fix(curve.grad_norm)
    copy = dataclasses.replace(curve, **changes)
    return LabelledCurve(item.name, copy, item.labels)


def run_ours(item: LabelledCurve) -> Run:
    """Replay the curve through the full pipeline and score its loss alarms."""
    from spikewatch.replay.analyze import analyze  # noqa: PLC0415

    report = analyze(item.curve)
    alarms = [e.detected_step for e in report.events if e.metric == "loss"]
    rollbacks = sum(1 for e in report.events if e.action == "rollback")
    return Run(score_curve(item.labels, alarms, item.curve.steps), rollbacks)


def run_baseline(factory: BaselineFactory, item: LabelledCurve) -> Run:
    """Feed the curve's losses to a fresh baseline and score the steps where it alarmed."""
    detector = factory(len(item.curve))
    alarms = [
        s for s, x in zip(item.curve.steps, item.curve.loss, strict=True) if detector.update(x)
    ]
    return Run(score_curve(item.labels, alarms, item.curve.steps), None)


def evaluate(curves: Sequence[LabelledCurve]) -> dict[str, dict[str, Run]]:
    """Runs by detector name (``ours`` first, then the baselines), then by curve name."""
    runs: dict[str, dict[str, Run]] = {OURS: {c.name: run_ours(c) for c in curves}}
    for name, factory in BASELINES.items():
        runs[name] = {c.name: run_baseline(factory, c) for c in curves}
    return runs


def evaluate_rounded(curves: Sequence[LabelledCurve]) -> dict[int, dict[str, Run]]:
    """Our runs on the rounded variants: by decimals, then by curve name."""
    return {d: {c.name: run_ours(rounded(c, d)) for c in curves} for d in ROUNDINGS}


def rates(runs: Sequence[Run]) -> dict[str, Any]:
    """Pooled rates of some runs plus their rollback total (0 for a baseline)."""
    out: dict[str, Any] = summarize(r.score for r in runs).to_json()
    out["rollbacks"] = sum(r.rollbacks or 0 for r in runs)
    return out


def per_curve(runs: dict[str, dict[str, Run]]) -> dict[str, dict[str, Any]]:
    """For each curve: its size, label count and every detector's rates and counts."""
    table: dict[str, dict[str, Any]] = {}
    for detector, by_curve in runs.items():
        for curve, run in by_curve.items():
            row = table.setdefault(curve, {"points": run.score.points, "spikes": run.score.spans})
            row[detector] = rates([run]) | {
                "hits": run.score.hits,
                "false_alarms": run.score.false_alarms,
                "borderline_alarms": run.score.borderline_alarms,
            }
    return table


def rounded_per_curve(
    raw: dict[str, Run], variants: dict[int, dict[str, Run]]
) -> dict[str, dict[str, Any]]:
    """For each curve: hits, false alarms and rollbacks of ours, raw and per rounding."""

    def cell(run: Run) -> dict[str, Any]:
        score = run.score
        return {"hits": score.hits, "false_alarms": score.false_alarms, "rollbacks": run.rollbacks}

    table: dict[str, dict[str, Any]] = {}
    for curve, run in raw.items():
        row = {"points": run.score.points, "spikes": run.score.spans, "raw": cell(run)}
        row |= {str(d): cell(by_curve[curve]) for d, by_curve in variants.items()}
        table[curve] = row
    return table


def spikewatch_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).with_name("spikewatch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "spikewatch.cli"]


def time_replay(path: Path, repeats: int = 3) -> float | None:
    """Best wall seconds of ``repeats`` runs of ``spikewatch replay PATH --json``.

    The best, not the mean: other processes on the machine only ever add time, so the
    fastest run is the closest to what the command itself costs. None (with a note) if
    it fails.
    """
    best: float | None = None
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(
            [*spikewatch_command(), "replay", str(path), "--json"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            note = done.stderr.strip()[-500:]
            print(f"note: spikewatch replay failed: {note}", file=sys.stderr)
            return None
        best = seconds if best is None else min(best, seconds)
    return best


def detector_update_median_us(losses: Sequence[float]) -> float:
    """Median µs of one `RobustSpikeDetector.update` (timer overhead subtracted)."""
    clock = time.perf_counter_ns
    overhead = statistics.median(-clock() + clock() for _ in range(10_000))
    detector = RobustSpikeDetector()
    samples = []
    for x in losses:
        start = clock()
        detector.update(x)
        samples.append(clock() - start)
    return max(statistics.median(samples) - overhead, 0.0) / 1000.0


def pipeline_per_record_us(curve: Curve, repeats: int = 3) -> float:
    """Median over ``repeats`` replays of the pipeline's µs per logged record."""
    from spikewatch.replay.analyze import analyze  # noqa: PLC0415

    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        analyze(curve)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) / len(curve) * 1e6


def measure(curves_dir: Path, curves: Sequence[LabelledCurve]) -> dict[str, float | None]:
    """The three timings, on the 20344-step curve (or the longest one if it is absent)."""
    pick = {c.name: c for c in curves}.get(TIMING_CURVE) or max(curves, key=lambda c: len(c.curve))
    return {
        "replay_seconds_20344": time_replay(curves_dir / f"{pick.name}.csv"),
        "detector_update_median_us": detector_update_median_us(pick.curve.loss),
        "pipeline_per_record_median_us": pipeline_per_record_us(pick.curve),
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def overall_table(result: dict[str, Any]) -> str:
    """One row per detector: pooled precision, recall, F1, delay, clean-curve FA rate."""
    lines = [
        f"{'detector':<20}{'precision':>10}{'recall':>8}{'F1':>8}"
        f"{'med.delay':>11}{'FA/10k clean':>14}{'rollbacks':>11}"
    ]
    rows = {OURS: result[OURS], **result["baselines"]}
    for name, r in rows.items():
        rollbacks = str(r["rollbacks"]) if name == OURS else "-"  # baselines have no policy
        lines.append(
            f"{name:<20}{_fmt(r['precision']):>10}{_fmt(r['recall']):>8}{_fmt(r['f1']):>8}"
            f"{_fmt(r['median_delay'], 1):>11}{_fmt(r['false_alarms_per_10k'], 2):>14}"
            f"{rollbacks:>11}"
        )
    return "\n".join(lines)


def curve_table(result: dict[str, Any]) -> str:
    """One row per curve; each detector cell reads ``hits/spikes false-alarms``."""
    detectors = [OURS, *result["baselines"]]
    head = f"{'curve':<32}{'points':>7}" + "".join(f"{d[:17]:>18}" for d in detectors)
    lines = [head + f"{'rollbacks':>11}"]
    for curve, row in result["per_curve"].items():
        cells = "".join(
            f"{row[d]['hits']:>8}/{row['spikes']:<3}{row[d]['false_alarms']:>6}" for d in detectors
        )
        lines.append(f"{curve:<32}{row['points']:>7}{cells}{row[OURS]['rollbacks']:>11}")
    return "\n".join(lines)


def rounded_table(result: dict[str, Any]) -> str:
    """Ours on the raw curves and on each rounding: pooled rates and rollbacks."""
    lines = [
        f"{'curves':<20}{'precision':>10}{'recall':>8}{'F1':>8}"
        f"{'med.delay':>11}{'FA/10k clean':>14}{'rollbacks':>11}"
    ]
    rows = {"raw": result[OURS]} | {f"{d} decimals": r for d, r in result["rounded"].items()}
    for name, r in rows.items():
        lines.append(
            f"{name:<20}{_fmt(r['precision']):>10}{_fmt(r['recall']):>8}{_fmt(r['f1']):>8}"
            f"{_fmt(r['median_delay'], 1):>11}{_fmt(r['false_alarms_per_10k'], 2):>14}"
            f"{r['rollbacks']:>11}"
        )
    return "\n".join(lines)


def rounded_curve_table(result: dict[str, Any]) -> str:
    """One row per curve; each cell reads ``hits/spikes false-alarms rollbacks``."""
    variants = ["raw", *(str(d) for d in ROUNDINGS)]
    names = {"raw": "raw", **{str(d): f"{d} decimals" for d in ROUNDINGS}}
    head = f"{'curve':<32}{'points':>7}" + "".join(f"{names[v]:>20}" for v in variants)
    lines = [head]
    for curve, row in result["rounded_per_curve"].items():
        cells = "".join(
            f"{row[v]['hits']:>9}/{row['spikes']:<3}{row[v]['false_alarms']:>4}"
            f"{row[v]['rollbacks']:>4}"
            for v in variants
        )
        lines.append(f"{curve:<32}{row['points']:>7}{cells}")
    return "\n".join(lines)


def report_text(result: dict[str, Any]) -> str:
    """The human-readable report: per-curve tables, overall tables, timings."""
    replay = result["replay_seconds_20344"]
    return "\n".join(
        [
            f"curves: {result['curves_dir']}",
            "",
            "per curve (cells: hits/labelled spikes, false alarms)",
            curve_table(result),
            "",
            "overall (delay in steps; FA/10k counted on the clean curves only)",
            overall_table(result),
            "",
            "ours on rounded logs, per curve (cells: hits/labelled spikes, false alarms, "
            "rollbacks)",
            rounded_curve_table(result),
            "",
            "ours on rounded logs, overall (loss and grad norm rounded as printed)",
            rounded_table(result),
            "",
            f"spikewatch replay {TIMING_CURVE}.csv --json: "
            + ("failed" if replay is None else f"{replay:.2f} s end to end (best of 3)"),
            f"RobustSpikeDetector.update: {result['detector_update_median_us']:.2f} µs median",
            f"full pipeline: {result['pipeline_per_record_median_us']:.2f} µs per record",
        ]
    )


def benchmark(curves_dir: Path) -> dict[str, Any]:
    """Everything the report shows, as JSON types."""
    curves = load_curves(curves_dir)
    if not curves:
        raise SystemExit(f"no labelled *.csv curves in {curves_dir}; pass --curves DIR")
    runs = evaluate(curves)
    result: dict[str, Any] = {"curves_dir": str(curves_dir)}
    result[OURS] = rates(list(runs[OURS].values()))
    result["baselines"] = {n: rates(list(runs[n].values())) for n in runs if n != OURS}
    variants = evaluate_rounded(curves)
    result["rounded"] = {str(d): rates(list(v.values())) for d, v in variants.items()}
    result.update(measure(curves_dir, curves))
    result["per_curve"] = per_curve(runs)
    result["rounded_per_curve"] = rounded_per_curve(runs[OURS], variants)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the benchmark, print a table or JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--curves", type=Path, default=DEFAULT_CURVES, help=f"default: {DEFAULT_CURVES}"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    result = benchmark(args.curves.resolve())
    print(json.dumps(result, indent=2) if args.json else report_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
