"""Forensics in the trainer: keep recent batches, probe them after a rollback, quarantine.

After a rollback restores the pre-onset state, `Forensics.probe` re-evaluates the
suspect batches forward only and compares them with ordinary ones
(`spikewatch.forensics.judge`); the monitor turns the `Verdict` into the next action.
"""

from spikewatch_hooks.forensics.cache import BatchCache
from spikewatch_hooks.forensics.probe import Forensics

__all__ = ["BatchCache", "Forensics"]
