"""Loss-spike rules of three training frameworks, re-implemented as streaming baselines.

Each baseline is fed one logged loss at a time with ``update(x)`` and answers True when its
framework would have raised the alarm (logged a spike, skipped the step, stopped the run) at
that value. None of them has a recovery policy; the harness merges consecutive alarms into
one. The rules and defaults were read from the frameworks' sources (cited on each class);
the code here is ours.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

from spikewatch.validation import check_float, check_int


class Baseline(Protocol):
    """What the harness needs from a baseline: a name and one verdict per value."""

    name: str

    def update(self, x: float) -> bool:
        """Take the next logged loss; return True when the rule alarms at it."""
        ...


class LlmFoundryKillLossSpike:
    """llm-foundry's ``KillLossSpike`` callback (two rules, either one alarms).

    Source: mosaicml/llm-foundry, ``llmfoundry/callbacks/kill_loss_spike_callback.py``.

    * Spike: ``x >= outlier_multiplier x mean(window)`` counts an outlier; a non-outlier
      resets the count; the alarm is raised while the count exceeds ``patience``, so the
      defaults need 5 outliers in a row (the alarm is on the 5th).
    * High loss: from step ``2 x window`` on, alarm when at least half of the window is
      above ``loss_cap``.

    The window holds the previous losses, outliers included, and nothing is checked until it
    is full. Upstream starts with 100 values and then widens it to
    ``max(100, round(0.05 x total steps))``; ``total_points`` plays that role here.
    Upstream would lower ``loss_cap`` to the maximum of the first window, but the step test
    guarding that assignment (``current_step == window_size``) never holds, because Composer
    has already counted the current batch when ``batch_end`` runs, so the cap stays 10.

    Example:
        >>> det = LlmFoundryKillLossSpike(window_size=10)
        >>> stream = [1.0] * 10 + [6.0] * 6 + [1.0]
        >>> [t for t, x in enumerate(stream) if det.update(x)]  # 5th outlier in a row
        [14]
    """

    name = "llm-foundry"

    def __init__(
        self,
        *,
        patience: int = 4,
        outlier_multiplier: float = 2.0,
        window_size: int = 100,
        total_points: int | None = None,
        loss_cap: float = 10.0,
    ) -> None:
        self.patience = check_int("patience", patience, minimum=0)
        self.outlier_multiplier = check_float("outlier_multiplier", outlier_multiplier, 0.0)
        self.window_size = check_int("window_size", window_size, minimum=1)
        self.total_points = total_points
        self.loss_cap = check_float("loss_cap", loss_cap, minimum=-math.inf)
        size = self.window_size
        if total_points is not None:
            size = max(size, round(float(check_int("total_points", total_points, 0) * 0.05)))
        self._window: deque[float] = deque(maxlen=size)
        self._sum = 0.0
        self._above_cap = 0
        self._outliers = 0
        self._seen = 0

    def update(self, x: float) -> bool:
        """Take the next loss; True while either upstream rule fires."""
        self._seen += 1
        size = self._window.maxlen or 1
        alarm = False
        if len(self._window) == size:
            if x >= self._sum / size * self.outlier_multiplier:
                self._outliers += 1
                alarm = self._outliers > self.patience
            else:
                self._outliers = 0
            if not alarm and self._seen >= 2 * size:
                alarm = self._above_cap >= size / 2
            oldest = self._window[0]
            self._sum -= oldest
            self._above_cap -= oldest > self.loss_cap
        self._window.append(x)
        self._sum += x
        self._above_cap += x > self.loss_cap
        if self._seen % size == 0:  # re-sum now and then so rounding cannot drift
            self._sum = math.fsum(self._window)
        return alarm


class OlmoCoreSkipStep:
    """OLMo-core's ``SkipStepOptimizer`` rule for skipping a step on a loss spike.

    Source: allenai/OLMo-core, ``src/olmo_core/optim/skip_step_optimizer.py``.

    The step is skipped unless ``x - mean <= sigma_factor x std`` over the previous
    ``rolling_interval_length`` losses (sample std, ``torch.std_mean``'s default
    correction=1). Every loss enters the history, spikes included. Nothing is skipped while
    fewer than ``max(20, rolling_interval_length // 2)`` losses, the current one included,
    were seen. A NaN loss fails the test, so it is skipped too. Upstream applies the same
    test to the grad norm (either one skips); this baseline sees the loss only.

    Example:
        >>> def skipped(stream):
        ...     det = OlmoCoreSkipStep(rolling_interval_length=40)
        ...     return [t for t, x in enumerate(stream) if det.update(x)]
        >>> skipped([1.0, 1.1] * 20 + [1.0, 1.0, 1.6])
        [42]
        >>> skipped([1.0, 1.1] * 20 + [2.0, 1.0, 1.6])  # the first spike widens the band
        [40]
    """

    name = "olmo-core"

    def __init__(self, *, rolling_interval_length: int = 128, sigma_factor: float = 6.0) -> None:
        self.rolling_interval_length = check_int(
            "rolling_interval_length", rolling_interval_length, minimum=2
        )
        self.sigma_factor = check_float("sigma_factor", sigma_factor, minimum=0.0)
        self._history: deque[float] = deque(maxlen=self.rolling_interval_length)

    def update(self, x: float) -> bool:
        """Take the next loss; True when the optimizer would skip this step."""
        history = self._history
        alarm = False
        if len(history) + 1 >= max(20, self.rolling_interval_length // 2):
            mean, std = _mean_std(history, ddof=1)
            alarm = not (x - mean <= self.sigma_factor * std)
        history.append(x)
        return alarm


class OlmoCoreStabilityMonitor:
    """OLMo-core's ``StabilityMonitorCallback`` spike test (it only counts spikes).

    Source: allenai/OLMo-core, ``src/olmo_core/train/callbacks/stability_monitor.py``.

    A spike is ``x > mean + threshold_std x std`` over the previous ``window_size`` losses
    (population std), checked only once the window is full and never when
    ``std < 1e-10``. Every loss enters the window, spikes included.

    Example:
        >>> det = OlmoCoreStabilityMonitor(window_size=4, threshold_std=2.0)
        >>> stream = [1.0, 2.0, 1.0, 2.0, 5.0, 1.0, 2.0, 9.0]
        >>> [t for t, x in enumerate(stream) if det.update(x)]
        [4, 7]
    """

    name = "olmo-core-monitor"

    def __init__(self, *, window_size: int = 128, threshold_std: float = 6.0) -> None:
        self.window_size = check_int("window_size", window_size, minimum=1)
        self.threshold_std = check_float("threshold_std", threshold_std, minimum=0.0)
        self._history: deque[float] = deque(maxlen=self.window_size)

    def update(self, x: float) -> bool:
        """Take the next loss; True when the callback would count a spike."""
        alarm = False
        if len(self._history) == self.window_size:
            mean, std = _mean_std(self._history, ddof=0)
            alarm = std >= 1e-10 and x > mean + self.threshold_std * std
        self._history.append(x)
        return alarm


class LightningSpikeDetection:
    """Lightning's ``SpikeDetection`` callback (Fabric and Trainer share the rule).

    Sources: Lightning-AI/pytorch-lightning, ``src/lightning/fabric/utilities/spike.py``
    (the rule) and ``src/lightning/pytorch/callbacks/spike.py`` (the Trainer adapter).

    From batch index ``warmup`` on, a value is a spike when it is not an improvement on the
    last accepted value (``mode``) and both ``|x - mean| >= |atol|`` and
    ``|x - mean| >= |rtol x mean|`` hold (a None tolerance always passes), with ``mean``
    the running mean of the last ``window`` accepted values. Upstream then stops training
    and writes ``[i - 1, i]`` to ``exclude_batches_path``; here the pair is kept in
    `bad_batches` (no file) and the replay goes on. A spike never enters the mean.
    With the default ``finite_only=True`` a non-finite value is a spike (the upstream
    docstring says the opposite, the code does this); with ``finite_only=False`` it is
    neither a spike nor accepted.

    Example:
        >>> det = LightningSpikeDetection(window=3)
        >>> stream = [1.0, 1.1, 0.9, 3.5, 1.0, 2.9, 3.1, float("nan")]
        >>> [t for t, x in enumerate(stream) if det.update(x)]
        [3, 7]
        >>> det.bad_batches
        [2, 3, 6, 7]
    """

    name = "lightning"

    def __init__(
        self,
        *,
        mode: str = "min",
        window: int = 10,
        warmup: int = 1,
        atol: float | None = None,
        rtol: float | None = 2.0,
        finite_only: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} is invalid: use 'min' or 'max'")
        self.mode = mode
        self.window = check_int("window", window, minimum=1)
        self.warmup = check_int("warmup", warmup, minimum=0)
        self.atol = atol
        self.rtol = rtol
        self.finite_only = finite_only
        self.bad_batches: list[int] = []
        self._accepted: deque[float] = deque(maxlen=self.window)
        self._last = 0.0
        self._index = -1

    def update(self, x: float) -> bool:
        """Take the next loss; True when the callback would stop training here."""
        self._index += 1
        spike = self._index >= self.warmup and self._is_spike(x)
        if spike:
            self.bad_batches.extend([self._index - 1, self._index])
        elif self.finite_only or math.isfinite(x):
            self._accepted.append(x)
            self._last = x
        return spike

    def _is_spike(self, x: float) -> bool:
        if self.finite_only and not math.isfinite(x):
            return True
        diff = x - self._last
        if (diff <= 0.0) if self.mode == "min" else (diff >= 0.0):
            return False
        mean = math.fsum(self._accepted) / len(self._accepted) if self._accepted else math.nan
        gap = abs(x - mean)
        atol_ok = self.atol is None or gap >= abs(self.atol)
        rtol_ok = self.rtol is None or gap >= abs(self.rtol * mean)
        return atol_ok and rtol_ok


def _mean_std(values: deque[float], *, ddof: int) -> tuple[float, float]:
    """Mean and standard deviation (``ddof`` as in numpy) of a non-empty window."""
    n = len(values)
    mean = math.fsum(values) / n
    if n - ddof <= 0:
        return mean, math.nan
    return mean, math.sqrt(math.fsum([(v - mean) * (v - mean) for v in values]) / (n - ddof))


BaselineFactory = Callable[[int], Baseline]
"""Builds a fresh baseline for a curve of the given number of logged points."""

BASELINES: dict[str, BaselineFactory] = {
    LlmFoundryKillLossSpike.name: lambda points: LlmFoundryKillLossSpike(total_points=points),
    OlmoCoreSkipStep.name: lambda points: OlmoCoreSkipStep(),
    OlmoCoreStabilityMonitor.name: lambda points: OlmoCoreStabilityMonitor(),
    LightningSpikeDetection.name: lambda points: LightningSpikeDetection(),
}
"""Every baseline at its framework's defaults, by name."""
