"""Root pytest configuration.

Doctest collection skips adapters whose framework is absent. Under CI (``CI=true``), where
every component is installed, a skipped test is a failure: a missing framework, binary or
tool must not hide there behind a skip (run locally, the skip and its reason are shown).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Generator
from typing import Any

import pytest

collect_ignore = [
    path
    for path, framework in (
        ("hooks/spikewatch_hooks/adapters/hf", "transformers"),
        ("hooks/spikewatch_hooks/adapters/lightning.py", "lightning"),
    )
    if importlib.util.find_spec(framework) is None
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _fail_skip(report: Any) -> None:
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (every component is installed there): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    """A skipped test under CI is a failure."""
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    """A module skipped at collection (``importorskip``) under CI is a failure."""
    outcome = yield
    _fail_skip(outcome.get_result())
