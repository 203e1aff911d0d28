"""Root pytest configuration: doctest collection skips adapters whose framework is absent."""

from __future__ import annotations

import importlib.util

collect_ignore = [
    path
    for path, framework in (
        ("hooks/spikewatch_hooks/adapters/hf.py", "transformers"),
        ("hooks/spikewatch_hooks/adapters/lightning.py", "lightning"),
    )
    if importlib.util.find_spec(framework) is None
]
