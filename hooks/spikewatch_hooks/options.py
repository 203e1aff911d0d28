"""The options every trainer hook shares, validated once (SpikeGuard, HF, Lightning)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from spikewatch.errors import bad_value
from spikewatch.http_transport import HttpTransport
from spikewatch.monitor import Monitor
from spikewatch.settings import MonitorConfig
from spikewatch.transport import EmbeddedTransport, Transport
from spikewatch.validation import check_int
from spikewatch_hooks.distributed import Lockstep
from spikewatch_hooks.engine import GuardEngine, check_components


@dataclass(frozen=True)
class GuardOptions:
    """What a hook was asked for; `build` validates, `engine` builds the `GuardEngine`.

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
    transport: Transport

    @classmethod
    def build(
        cls,
        *,
        run_id: str = "run",
        config: MonitorConfig | None = None,
        snapshot_every: int = 100,
        keep_snapshots: int = 4,
        margin: int | None = None,
        transport: Transport | None = None,
        monitor_url: str | None = None,
        token: str | None = None,
    ) -> GuardOptions:
        """Validate the options, with the fix in every message."""
        if not isinstance(run_id, str) or not run_id:
            raise bad_value("run_id", run_id, "use a non-empty string naming the run")
        if config is not None and not isinstance(config, MonitorConfig):
            raise bad_value("config", config, "pass a MonitorConfig (from_mapping builds one)")
        config = config or MonitorConfig()
        if margin is not None:  # PolicyConfig validates it (margin=-1 -> a clear error)
            config = replace(config, policy=replace(config.policy, margin=margin))
        return cls(
            run_id=run_id,
            config=config,
            snapshot_every=check_int("snapshot_every", snapshot_every, minimum=1),
            keep_snapshots=check_int("keep_snapshots", keep_snapshots, minimum=1),
            transport=transport or _transport(run_id, config, monitor_url, token),
        )

    def engine(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        lockstep: Lockstep | None = None,
    ) -> GuardEngine:
        """Check the live training objects and build the engine on them."""
        if (lockstep is not None or Lockstep.active()) and not isinstance(
            self.transport, EmbeddedTransport
        ):
            # Every rank must decide alike from the same monitor; a service answers one
            # client at its own pace, and ranks would hand off at different steps.
            raise bad_value(
                "monitor_url",
                getattr(self.transport, "url", type(self.transport).__name__),
                "use the embedded monitor (no monitor_url) under torch.distributed: every "
                "rank runs it in lockstep; service mode for distributed runs is not there yet",
            )
        check_components(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            snapshot_every=self.snapshot_every,
            keep_snapshots=self.keep_snapshots,
            checkpoint_every=0,
            checkpoint_dir=None,
        )
        return GuardEngine(
            model,
            optimizer,
            scheduler,
            transport=self.transport,
            config=self.config,
            snapshot_every=self.snapshot_every,
            keep_snapshots=self.keep_snapshots,
            run_id=self.run_id,
            lockstep=lockstep,
        )


def _transport(
    run_id: str, config: MonitorConfig, monitor_url: str | None, token: str | None
) -> Transport:
    """The embedded monitor, or the HTTP client of a `spikewatch serve` at ``monitor_url``."""
    if monitor_url is None:
        return EmbeddedTransport(Monitor(run=run_id, config=config))
    return HttpTransport(monitor_url, run=run_id, token=token)
