"""Service settings: one frozen, validated object, read from a TOML file.

Example:
    >>> cfg = ServiceConfig.from_mapping({"service": {"port": 9000, "approval": "manual"},
    ...                                   "monitor": {"threshold": 6}})
    >>> cfg.port, cfg.approval, cfg.monitor.threshold
    (9000, 'manual', 6)
    >>> ServiceConfig.from_mapping({"service": {"aproval": "manual"}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    spikewatch.errors.ConfigError: unknown setting 'aproval' in [service]: known settings are ...
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from spikewatch.errors import ConfigError, bad_value
from spikewatch.records import ACTION_SEVERITY
from spikewatch.service.store_retention import RetentionPolicy
from spikewatch.settings import MonitorConfig
from spikewatch.validation import check_float, check_int


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """How `spikewatch serve` runs.

    Attributes:
        host: interface to bind (keep 127.0.0.1 unless a proxy or the network is trusted).
        port: TCP port of the HTTP API and /metrics.
        db: SQLite event store path.
        max_body_bytes: largest request body accepted (413 beyond).
        max_records: most records in one ingest request (422 beyond).
        approval: ``auto``: the trainer rolls back on its own decision at once;
            ``manual``: each rollback it decides is *proposed* (training goes on, bad
            updates are still skipped) until an operator approves or vetoes it.
        approval_timeout_s: how long a proposal waits for an operator.
        approval_default: what a proposal nobody answered becomes: ``rollback`` or ``veto``.
        notify_min_action: incidents whose action reaches this go to Slack at once
            (the others appear in the digest).
        stall_after_s: a run with no records for this long is *stalled*.
        stall_check_interval_s, sweep_interval_s, digest_interval_s,
        retention_interval_s: periods of the scheduled jobs (0 disables digest).
        sweep_records: records per run the change-point sweep looks at.
        keep_records: records kept per run (older batches are pruned).
        max_record_age_s: records older than this are pruned.
        state_every_s: the longest a run's monitor state goes unsaved. Every batch is
            stored at once; the state only this often (and at once when a batch caused a
            decision, a command or a rewind), since encoding it costs more than the
            detectors. A restart replays the batches stored after the saved state.
        snapshot_every: steps between detector snapshots (what a rollback rewinds to;
            taken when the state is saved).
        keep_snapshots: detector snapshots kept per run.
        keep_incidents: incidents kept per run (the newest; older ones are pruned),
            which is also the most a restart loads into memory per run.
        max_incident_age_s: incidents not updated for this long are pruned, and Slack
            messages sent (or unsent) for this long leave the outbox.
        keep_decisions: stored decisions kept per run (the newest).
        max_decision_age_s: decisions older than this are pruned.
        recent_records: records per run kept in memory for charts.
        monitor: detection and policy settings, as for the embedded monitor.
        slack: the ``[slack]`` section, read by the Slack sink.
    """

    host: str = "127.0.0.1"
    port: int = 9650
    db: str = "spikewatch.db"
    max_body_bytes: int = 8 * 1024 * 1024
    max_records: int = 50_000
    approval: str = "auto"
    approval_timeout_s: float = 3600.0
    approval_default: str = "veto"
    notify_min_action: str = "rollback"
    stall_after_s: float = 300.0
    stall_check_interval_s: float = 15.0
    sweep_interval_s: float = 60.0
    digest_interval_s: float = 3600.0
    retention_interval_s: float = 600.0
    sweep_records: int = 2000
    keep_records: int = 20_000
    max_record_age_s: float = 7 * 24 * 3600.0
    state_every_s: float = 1.0
    snapshot_every: int = 100
    keep_snapshots: int = 32
    keep_incidents: int = 1000
    max_incident_age_s: float = 90 * 24 * 3600.0
    keep_decisions: int = 10_000
    max_decision_age_s: float = 30 * 24 * 3600.0
    recent_records: int = 4096
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    slack: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_int("port", self.port, minimum=0)
        check_int("max_body_bytes", self.max_body_bytes, minimum=1024)
        check_int("max_records", self.max_records, minimum=1)
        if self.approval not in ("auto", "manual"):
            raise bad_value("approval", self.approval, "use 'auto' or 'manual'")
        check_float("approval_timeout_s", self.approval_timeout_s, minimum=0.0, inclusive=False)
        if self.approval_default not in ("rollback", "veto"):
            raise bad_value("approval_default", self.approval_default, "use 'rollback' or 'veto'")
        if self.notify_min_action not in ACTION_SEVERITY:
            raise bad_value(
                "notify_min_action", self.notify_min_action, "use " + ", ".join(ACTION_SEVERITY)
            )
        for name in (
            "stall_after_s",
            "stall_check_interval_s",
            "sweep_interval_s",
            "retention_interval_s",
        ):
            check_float(name, getattr(self, name), minimum=0.0, inclusive=False)
        check_float("digest_interval_s", self.digest_interval_s, minimum=0.0)
        for name in ("max_record_age_s", "max_incident_age_s", "max_decision_age_s"):
            check_float(name, getattr(self, name), minimum=0.0, inclusive=False)
        check_float("state_every_s", self.state_every_s, minimum=0.0)
        for name in (
            "sweep_records",
            "keep_records",
            "snapshot_every",
            "keep_snapshots",
            "keep_incidents",
            "keep_decisions",
            "recent_records",
        ):
            check_int(name, getattr(self, name), minimum=1)

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> ServiceConfig:
        """Build from parsed TOML: ``[service]``, ``[monitor]`` and ``[slack]`` sections."""
        _reject_unknown(data, {"service", "monitor", "slack"}, "the file")
        service = dict(data.get("service", {}))
        known = {f.name for f in dataclasses.fields(cls)} - {"monitor", "slack"}
        _reject_unknown(service, known, "[service]")
        return cls(
            **service,
            monitor=MonitorConfig.from_mapping(data.get("monitor", {})),
            slack=dict(data.get("slack", {})),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ServiceConfig:
        """Read a TOML config file."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(
                f"config file {str(path)!r} cannot be read ({exc}): check --config"
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
        return cls.from_mapping(data)

    def retention(self) -> RetentionPolicy:
        """What the retention job keeps, from these settings."""
        return RetentionPolicy(
            keep_records=self.keep_records,
            max_record_age_s=self.max_record_age_s,
            keep_snapshots=self.keep_snapshots,
            keep_incidents=self.keep_incidents,
            max_incident_age_s=self.max_incident_age_s,
            keep_decisions=self.keep_decisions,
            max_decision_age_s=self.max_decision_age_s,
        )


def _reject_unknown(data: dict[str, Any], known: set[str], section: str) -> None:
    for key in data:
        if key not in known:
            raise ConfigError(
                f"unknown setting {key!r} in {section}: known settings are "
                + ", ".join(sorted(known))
            )
