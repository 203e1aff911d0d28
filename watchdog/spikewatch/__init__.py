"""spikewatch: a loss-spike watchdog for training runs (the monitor side; never imports torch)."""

from __future__ import annotations

__version__ = "0.1.0"
