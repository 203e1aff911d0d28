"""Monitor settings: one frozen, validated object, buildable from a TOML/JSON mapping."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from spikewatch.errors import ConfigError
from spikewatch.forensics.verdict import ForensicsConfig
from spikewatch.policy import PolicyConfig
from spikewatch.validation import check_float, check_int


@dataclass(frozen=True)
class MonitorConfig:
    """How the monitor detects (stage 1 and 2); ``policy`` says what it then does.

    Attributes:
        window: values in the rolling baseline of each metric.
        threshold: robust z-score above which a loss value is a spike.
        min_rise: a loss spike must also rise this fraction above the baseline.
        grad_threshold: robust z-score above which a grad-norm value is a spike.
        warmup: records at the start of a run (or after a reset) that never alarm.
        max_consecutive: flags in a row after which a jump counts as a new level.
        drift_delta: Page-Hinkley allowance, in robust sigmas per step.
        drift_threshold: Page-Hinkley alarm level, in robust sigmas.
        confirm_after: records after an excursion before change-point confirmation.
        pre_window: records before the candidate given to change-point analysis.
        cpd_penalty: ruptures penalty, in units of spread^2 * log(n).
        elevated: a segment above baseline + elevated * spread is part of the excursion.
        forensics: the probe after a rollback and what its verdict does (`ForensicsConfig`).

    Example:
        >>> MonitorConfig.from_mapping({"threshold": 6, "policy": {"margin": 50}}).policy.margin
        50
        >>> MonitorConfig.from_mapping({"treshold": 6})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: unknown setting 'treshold' in monitor: known settings are ...
    """

    window: int = 50
    threshold: float = 8.0
    min_rise: float = 0.10
    grad_threshold: float = 8.0
    warmup: int = 50
    max_consecutive: int = 16
    drift_delta: float = 0.5
    drift_threshold: float = 30.0
    confirm_after: int = 8
    pre_window: int = 64
    cpd_penalty: float = 3.0
    elevated: float = 4.0
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    forensics: ForensicsConfig = field(default_factory=ForensicsConfig)

    def __post_init__(self) -> None:
        check_int("window", self.window, minimum=4)
        check_float("threshold", self.threshold, minimum=0.0, inclusive=False)
        check_float("min_rise", self.min_rise, minimum=0.0)
        check_float("grad_threshold", self.grad_threshold, minimum=0.0, inclusive=False)
        check_int("warmup", self.warmup, minimum=0)
        check_int("max_consecutive", self.max_consecutive, minimum=1)
        check_float("drift_delta", self.drift_delta, minimum=0.0)
        check_float("drift_threshold", self.drift_threshold, minimum=0.0, inclusive=False)
        check_int("confirm_after", self.confirm_after, minimum=1)
        check_int("pre_window", self.pre_window, minimum=3)
        check_float("cpd_penalty", self.cpd_penalty, minimum=0.0, inclusive=False)
        check_float("elevated", self.elevated, minimum=0.0)

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> MonitorConfig:
        """Build from a parsed TOML/JSON mapping; unknown keys are errors, not typos ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        _reject_unknown(data, known, "monitor")
        values = {k: v for k, v in data.items() if k not in ("policy", "forensics")}
        policy_data = data.get("policy", {})
        _reject_unknown(policy_data, {f.name for f in dataclasses.fields(PolicyConfig)}, "policy")
        forensics_data = data.get("forensics", {})
        forensics_fields = {f.name for f in dataclasses.fields(ForensicsConfig)}
        _reject_unknown(forensics_data, forensics_fields, "forensics")
        forensics = ForensicsConfig(**forensics_data)
        return cls(**values, policy=PolicyConfig(**policy_data), forensics=forensics)


def _reject_unknown(data: dict[str, Any], known: set[str], section: str) -> None:
    for key in data:
        if key not in known:
            raise ConfigError(
                f"unknown setting {key!r} in {section}: known settings are "
                + ", ".join(sorted(known))
            )
