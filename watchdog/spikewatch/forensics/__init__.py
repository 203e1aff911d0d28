"""Forensics: after a rollback, was it the data or the state?

`ForensicsConfig` (part of `MonitorConfig`) says how far the trainer's probe goes and
what the policy does with its answer; `judge` turns the probe's losses into a
`Verdict`; `quarantine` keeps the samples a ``data`` verdict named (no torch here: the
probe itself runs in the trainer, `spikewatch_hooks.forensics`).
"""

from spikewatch.forensics.judge import BatchLoss, judge
from spikewatch.forensics.verdict import ForensicsConfig, Verdict

__all__ = ["BatchLoss", "ForensicsConfig", "Verdict", "judge"]
