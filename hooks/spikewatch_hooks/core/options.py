"""The options every trainer hook shares, validated once (SpikeGuard, HF, Lightning)."""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from spikewatch.errors import bad_value
from spikewatch.http_transport import TOKEN_ENV, HttpTransport
from spikewatch.monitor import Monitor
from spikewatch.service_transport import Approval, ServiceTransport, config_from_service
from spikewatch.settings import MonitorConfig
from spikewatch.transport import EmbeddedTransport, Transport
from spikewatch.validation import check_int, check_run_id
from spikewatch_hooks.core.checks import (
    check_components,
    check_snapshot_options,
    check_updaters,
    warn_uncovered,
)
from spikewatch_hooks.core.engine import GuardEngine
from spikewatch_hooks.distributed.lockstep import Lockstep


@dataclass(frozen=True)
class GuardOptions:
    """What a hook was asked for; `build` validates, `engine` builds the `GuardEngine`.

    The transport is made with the engine (at train start in the callbacks), so a
    callback holds no thread or socket when a launcher pickles it into worker processes.

    Example:
        >>> opts = GuardOptions.build(run_id="gpt", margin=50)
        >>> opts.config.policy.margin, opts.snapshot_every
        (50, 100)
        >>> GuardOptions.build(run_id="")
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: run_id='' is invalid: use a non-empty string naming the run
    """

    run_id: str
    config: MonitorConfig
    snapshot_every: int
    keep_snapshots: int
    transport: Transport | None = None
    monitor_url: str | None = None
    token: str | None = None
    #: The guard was given its own settings (config=): they beat the service's.
    explicit: bool = False
    #: The guard was given margin=: it beats the service's margin.
    margin: int | None = None
    #: Snapshot ring layout (`SnapshotRing`'s split, budget_bytes, include_frozen).
    snapshot_split: bool | None = None
    snapshot_budget_bytes: int | None = None
    snapshot_frozen: bool = False
    #: The guard was given snapshot_every= (otherwise it may be fitted to the run length).
    snapshot_given: bool = True

    @classmethod
    def build(
        cls,
        *,
        run_id: str = "run",
        config: MonitorConfig | None = None,
        snapshot_every: int | None = None,
        keep_snapshots: int = 4,
        margin: int | None = None,
        transport: Transport | None = None,
        monitor_url: str | None = None,
        token: str | None = None,
        snapshot_split: bool | None = None,
        snapshot_budget_bytes: int | None = None,
        snapshot_frozen: bool = False,
    ) -> GuardOptions:
        """Validate the options, with the fix in every message (``snapshot_every``
        None: 100, which `run_length.fit_to_run_length` may fit to a short run)."""
        check_snapshot_options(
            snapshot_split=snapshot_split,
            snapshot_budget_bytes=snapshot_budget_bytes,
            snapshot_frozen=snapshot_frozen,
        )
        if not isinstance(run_id, str) or not run_id:
            raise bad_value("run_id", run_id, "use a non-empty string naming the run")
        if config is not None and not isinstance(config, MonitorConfig):
            raise bad_value("config", config, "pass a MonitorConfig (from_mapping builds one)")
        explicit = config is not None
        config = config or MonitorConfig()
        if margin is not None:  # PolicyConfig validates it (margin=-1 -> a clear error)
            config = replace(config, policy=replace(config.policy, margin=margin))
        if monitor_url is not None:
            check_run_id("run_id", run_id)  # the service refuses any other: fail here
            token = check_service(monitor_url, token)
        return cls(
            run_id=run_id,
            config=config,
            snapshot_every=100
            if snapshot_every is None
            else check_int("snapshot_every", snapshot_every, minimum=1),
            keep_snapshots=check_int("keep_snapshots", keep_snapshots, minimum=1),
            transport=transport,
            monitor_url=monitor_url,
            token=token,
            explicit=explicit,
            margin=margin,
            snapshot_split=snapshot_split,
            snapshot_budget_bytes=snapshot_budget_bytes,
            snapshot_frozen=snapshot_frozen,
            snapshot_given=snapshot_every is not None,
        )

    def make_transport(self, lockstep: Lockstep | None = None) -> Transport:
        """The transport for this process: the embedded monitor, or (service mode) the
        trainer's own monitor reporting to the service — from rank 0 only."""
        given = self.transport
        if given is not None and not isinstance(given, HttpTransport):
            return given
        if given is None and self.monitor_url is None:
            return EmbeddedTransport(Monitor(run=self.run_id, config=self.config))
        client = given if isinstance(given, HttpTransport) else None
        if client is None and _leads(lockstep):
            assert self.monitor_url is not None  # given is None here
            client = HttpTransport(self.monitor_url, run=self.run_id, token=self.token)
        transport = ServiceTransport(Monitor(run=self.run_id, config=self.config), client)
        self.agree(transport, lockstep)
        return transport

    def agree(self, transport: ServiceTransport, lockstep: Lockstep | None) -> None:
        """Settle the run's settings: rank 0 asks the service, every rank uses its answer."""
        answer = None if transport.client is None else transport.client.fetch_config()
        if transport.client is not None:
            config, approval = config_from_service(
                answer, self.config, explicit=self.explicit, run=self.run_id
            )
            if self.margin is not None:
                config = replace(config, policy=replace(config.policy, margin=self.margin))
            settled = (dataclasses.asdict(config), dataclasses.asdict(approval))
        else:
            settled = (dataclasses.asdict(self.config), dataclasses.asdict(transport.approval))
        if lockstep is not None:
            settled = lockstep.broadcast(settled)
        config_json, approval_json = settled
        transport.monitor = Monitor(run=self.run_id, config=MonitorConfig.from_mapping(config_json))
        transport.approval = Approval.from_mapping(approval_json)
        if transport.client is not None:
            transport.client.configure({**config_json, "approval": approval_json})

    def engine(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        scheduler: Any,
        *,
        scaler: Any = None,
        lockstep: Lockstep | None = None,
        adopt_lockstep: bool = False,
    ) -> GuardEngine:
        """Check the live training objects and build the engine (and transport) on them.

        ``optimizer`` and ``scheduler`` may be lists; ``scaler`` a GradScaler (`Updates`).
        """
        check_updaters(optimizer, scheduler, scaler)
        check_components(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            snapshot_every=self.snapshot_every,
            keep_snapshots=self.keep_snapshots,
            checkpoint_every=0,
            checkpoint_dir=None,
        )
        warn_uncovered(model, optimizer)
        transport = self.make_transport(lockstep)
        monitor = getattr(transport, "monitor", None)
        return GuardEngine(
            model,
            optimizer,
            scheduler,
            scaler=scaler,
            transport=transport,
            config=self.config if monitor is None else monitor.config,
            snapshot_every=self.snapshot_every,
            keep_snapshots=self.keep_snapshots,
            run_id=self.run_id,
            lockstep=lockstep,
            adopt_lockstep=adopt_lockstep,
            ring_options={
                "split": self.snapshot_split,
                "budget_bytes": self.snapshot_budget_bytes,
                "include_frozen": self.snapshot_frozen,
            },
        )


def check_service(url: str, token: str | None) -> str:
    """Fail at construction on a monitor URL or token that cannot work; the token."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad_value("monitor_url", url, "use http://host:port of a running `spikewatch serve`")
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    if not token:
        raise bad_value("token", token, f"pass token= or set {TOKEN_ENV} (the service's token)")
    return token


def _leads(lockstep: Lockstep | None) -> bool:
    """Whether this process talks to the service: rank 0, or a process not (yet) in a
    group whose launcher did not name it another rank (torchrun sets ``RANK``)."""
    if lockstep is not None:
        return lockstep.rank == 0
    return os.environ.get("RANK", "0") == "0"
