"""The Hugging Face ``transformers.Trainer`` integration: `SpikewatchCallback`.

``callback`` holds the callback (the event timeline), ``taps`` the per-step taps on the
live Trainer (values and the skip ledger), ``resume`` the state kept in HF checkpoints.
"""

from __future__ import annotations

from spikewatch_hooks.adapters.hf.callback import SpikewatchCallback

__all__ = ["SpikewatchCallback"]
