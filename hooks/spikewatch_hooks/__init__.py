"""spikewatch_hooks: the trainer side of spikewatch (needs torch)."""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401  (fail early with a useful message)
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "spikewatch_hooks needs PyTorch: install it with `pip install 'spikewatch[torch]'` "
        "(or your own torch build first)"
    ) from exc

from spikewatch_hooks.guard import SpikeGuard
from spikewatch_hooks.state.ledger import SkipLedger

__all__ = ["SkipLedger", "SpikeGuard"]
__version__ = "0.1.0"
