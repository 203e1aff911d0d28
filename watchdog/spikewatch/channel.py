"""One metric's stream (loss or grad norm): stage-1 detectors, episodes, stage-2 confirmation."""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Any

from spikewatch.changepoint import ChangePointLocaliser
from spikewatch.detectors.drift import PageHinkleyDetector
from spikewatch.detectors.nonfinite import NonFiniteDetector
from spikewatch.detectors.robust import RobustSpikeDetector
from spikewatch.detectors.window import UNRESOLVED_STEPS
from spikewatch.episode import Episode, PendingCandidate
from spikewatch.fastpath import DriftState, RoutinePlan, plan_run, walk_drift
from spikewatch.records import Metric, Signal, SignalKind
from spikewatch.settings import MonitorConfig


class MetricChannel:
    """Streams one metric through the detectors and emits `Signal`s.

    A flagged value opens an *episode* and emits a streaming signal at once. The episode
    is confirmed by change-point analysis once ``confirm_after`` unflagged values have
    followed it (or as soon as the detector declares a new level), emitting a confirmed
    ``spike`` (transient) or ``level_shift`` (persistent) signal. The loss channel also
    runs a Page-Hinkley drift test and emits ``divergence`` signals.
    """

    def __init__(self, run: str, metric: Metric, config: MonitorConfig) -> None:
        self.run, self.metric, self.config = run, metric, config
        threshold = config.threshold if metric == "loss" else config.grad_threshold
        self.spike = RobustSpikeDetector(
            window=config.window,
            threshold=threshold,
            min_rise=config.min_rise if metric == "loss" else 0.0,
            warmup=config.warmup,
            min_history=min(20, config.window),
            max_consecutive=config.max_consecutive,
        )
        self.nonfinite = NonFiniteDetector()
        self.drift: PageHinkleyDetector | None = None
        if metric == "loss":
            self.drift = PageHinkleyDetector(
                delta=config.drift_delta, threshold=config.drift_threshold
            )
        self.localiser = ChangePointLocaliser(penalty=config.cpd_penalty, elevated=config.elevated)
        keep = config.pre_window + config.max_consecutive + config.confirm_after + 2
        self._history: deque[tuple[int, float]] = deque(maxlen=keep)
        self._count = 0
        self._episode: Episode | None = None
        self._nonfinite_onset = 0
        self._drift_onset = 0
        self._best_level = math.inf
        self._best_step = 0
        self._first_step = 0

    def update(self, step: int, value: float) -> list[Signal]:
        """Feed one value; return the signals it raised (usually none)."""
        if self._count == 0:
            self._first_step = step
        self._history.append((step, value))
        self._count += 1
        ended = self.nonfinite.consecutive
        if self.nonfinite.update(value):
            if self.nonfinite.consecutive == 1:
                self._nonfinite_onset = step
            return [self._nonfinite_signal(step, value)]
        if ended:  # the values are finite again: close the non-finite episode
            return [
                self._nonfinite_signal(step, value, last=self._history[-2][0]),
                *self._scored(step, value),
            ]
        return self._scored(step, value)

    def plan_routine(self, steps: list[int], values: list[float]) -> tuple[RoutinePlan, int] | None:
        """Score values in bulk; return the plan and how many lead-in values are routine.

        None when the channel is not steady (warm-up, a pending episode or NaN run), so
        the caller must use `update`. Nothing changes until `advance_routine`.
        """
        if self._episode is not None or self.nonfinite.consecutive:
            return None
        plan = plan_run(self.spike, steps, values)
        if plan is None:
            return None
        if self.drift is not None and plan.usable:
            usable, plan.drift_after = walk_drift(
                self._drift_state(), plan, self.drift, plan.usable
            )
            plan.usable = usable
        return plan, plan.usable

    def advance_routine(self, plan: RoutinePlan, count: int) -> None:
        """Take the first ``count`` planned values as `update` would (no signals)."""
        if count == 0:
            return
        values = plan.values[:count]
        self._history.extend(zip(plan.steps[:count], values, strict=True))
        self._count += count
        self.nonfinite.passed()
        last = count - 1
        self.spike.accept_many(
            values,
            score=float(plan.scores.score[last]),
            baseline=float(plan.scores.baseline[last]),
            spread=float(plan.scores.spread[last]),
            resolution=float(plan.scores.resolution_after[last]),
        )
        if self.drift is not None:
            s = plan.drift_after
            if count != plan.usable or s is None:
                _, s = walk_drift(self._drift_state(), plan, self.drift, count)
            self.drift.load_state_dict({"statistic": s.statistic, "since_zero": s.since_zero})
            self._best_level, self._best_step = s.best_level, s.best_step
            self._drift_onset = s.drift_onset

    def _drift_state(self) -> DriftState:
        assert self.drift is not None  # loss channel only
        return DriftState(
            self.drift.statistic,
            self.drift.state_dict()["since_zero"],
            self._best_level,
            self._best_step,
            self._drift_onset,
        )

    def _scored(self, step: int, value: float) -> list[Signal]:
        flagged = self.spike.update(value)
        if flagged:
            return self._on_flag(step, value)
        out = self._on_accepted(step)
        if self._episode is not None:
            self._episode.after += 1
            if self._episode.after >= self.config.confirm_after:
                out.append(self._confirm(step))
        return out

    def pending(self) -> PendingCandidate | None:
        """The episode waiting for confirmation, if any (read-only: nothing is decided)."""
        ep = self._episode
        if ep is None:
            return None
        incident = f"{self.metric}-spike-{ep.first_step}"
        return PendingCandidate(incident, ep.first_step, ep.peak_step, ep.after)

    def _on_flag(self, step: int, value: float) -> list[Signal]:
        out: list[Signal] = []
        ep = self._episode
        if ep is not None and ep.after >= 2:
            # The curve was back to normal in between: a new excursion, not the same one.
            out.append(self._confirm(self._history[-2][0], drop_last=True))
            ep = None
        if ep is None:
            ep = self._episode = Episode(
                first_step=step,
                first_index=self._count - 1,
                peak_step=step,
                peak_value=value,
                score=self.spike.score,
                baseline=self.spike.baseline,
                spread=self.spike.spread,
            )
            out.append(self._streaming(step, value))
        else:
            ep.after = 0
            if value > ep.peak_value:
                ep.peak_step, ep.peak_value = step, value
            ep.score = max(ep.score, self.spike.score)
        if self.spike.level_shift:
            out.append(self._confirm(step))
        return out

    def _on_accepted(self, step: int) -> list[Signal]:
        if self.drift is None or not self.spike.ready or self.spike.in_warmup:
            return []
        level = self.spike.level
        self._best_level = min(self._best_level, level)
        if level <= self._best_level + self.spike.spread:
            self._best_step = step  # the last step the curve was still at its best
        before = self.drift.statistic
        if self.drift.update(self.spike.score):
            # Page-Hinkley alone trips on healthy bumps of tight curves; a divergence
            # must also have lifted the level min_rise above the best level so far, and
            # by more than a step of the log's resolution (a rounded loss at 1e-4 moves
            # by 100 % in one step the log can print).
            rise = level - self._best_level
            unresolved = UNRESOLVED_STEPS * self.spike.resolution
            if rise > self.config.min_rise * abs(self._best_level) and rise > unresolved:
                return [self._divergence_signal(step)]
        if before == 0.0 and self.drift.statistic > 0.0:
            self._drift_onset = step
        return []

    def _confirm(self, step: int, *, drop_last: bool = False) -> Signal:
        ep = self._episode
        assert ep is not None  # only called with a pending episode
        self._episode = None
        oldest = self._count - len(self._history)
        start = max(ep.first_index - self.config.pre_window, oldest) - oldest
        window = list(self._history)[start : len(self._history) - int(drop_last)]
        values = [v for _, v in window]
        loc = self.localiser.localise(
            values, ep.first_index - oldest - start, baseline=ep.baseline, spread=ep.spread
        )
        kind: SignalKind = "spike" if loc.transient else "level_shift"
        return Signal(
            run=self.run,
            kind=kind,
            metric=self.metric,
            step=step,
            value=values[loc.peak],
            score=ep.score,
            baseline=ep.baseline,
            onset_step=window[loc.onset][0],
            peak_step=window[loc.peak][0],
            end_step=None if loc.end is None else window[loc.end][0],
            transient=loc.transient,
            shift=loc.shift,
            stage="confirmed",
            incident=f"{self.metric}-spike-{ep.first_step}",
        )

    def _streaming(self, step: int, value: float) -> Signal:
        return Signal(
            run=self.run,
            kind="spike",
            metric=self.metric,
            step=step,
            value=value,
            score=self.spike.score,
            baseline=self.spike.baseline,
            onset_step=step,
            peak_step=step,
            incident=f"{self.metric}-spike-{step}",
        )

    def _nonfinite_signal(self, step: int, value: float, *, last: int | None = None) -> Signal:
        """A non-finite value (streaming) or, with ``last``, the end of a run of them."""
        return Signal(
            run=self.run,
            kind="nonfinite",
            metric=self.metric,
            step=step,
            value=value,
            score=0.0,
            baseline=self.spike.baseline,
            onset_step=self._nonfinite_onset,
            peak_step=step if last is None else last,
            end_step=last,
            transient=None if last is None else True,
            stage="streaming" if last is None else "confirmed",
            incident=f"{self.metric}-nonfinite-{self._nonfinite_onset}",
        )

    def _divergence_signal(self, step: int) -> Signal:
        # The level is a rolling median lagging half a window: the curve left its best
        # level about that long before the level did.
        onset = min(self._drift_onset, self._best_step - self.config.window // 2, step)
        onset = max(onset, self._first_step)
        return Signal(
            run=self.run,
            kind="divergence",
            metric=self.metric,
            step=step,
            value=self._history[-1][1],
            score=self.spike.score,
            baseline=self.spike.baseline,
            onset_step=onset,
            peak_step=step,
            transient=False,
            incident=f"{self.metric}-divergence-{onset}",
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: detectors, history and any pending episode."""
        return {
            "spike": self.spike.state_dict(),
            "nonfinite": self.nonfinite.state_dict(),
            "drift": None if self.drift is None else self.drift.state_dict(),
            "history": [list(h) for h in self._history],
            "count": self._count,
            "episode": None if self._episode is None else dataclasses.asdict(self._episode),
            "nonfinite_onset": self._nonfinite_onset,
            "drift_onset": self._drift_onset,
            "best_level": None if math.isinf(self._best_level) else self._best_level,
            "best_step": self._best_step,
            "first_step": self._first_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.spike.load_state_dict(state["spike"])
        self.nonfinite.load_state_dict(state["nonfinite"])
        if self.drift is not None and state["drift"] is not None:
            self.drift.load_state_dict(state["drift"])
        self._history.clear()
        self._history.extend((int(s), float(v)) for s, v in state["history"])
        self._count = int(state["count"])
        ep = state["episode"]
        self._episode = None if ep is None else Episode(**ep)
        self._nonfinite_onset = int(state["nonfinite_onset"])
        self._drift_onset = int(state["drift_onset"])
        best = state["best_level"]
        self._best_level = math.inf if best is None else float(best)
        self._best_step = int(state["best_step"])
        self._first_step = int(state["first_step"])
