"""deploy/service.toml: the shipped configuration loads, equals the defaults, names every key."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from spikewatch.forensics.verdict import ForensicsConfig
from spikewatch.policy import PolicyConfig
from spikewatch.service.config import ServiceConfig
from spikewatch.settings import MonitorConfig
from spikewatch.sinks.slack_settings import SlackSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FILE = Path(__file__).resolve().parents[1] / "deploy" / "service.toml"


def test_the_shipped_config_loads_to_the_defaults() -> None:
    assert ServiceConfig.from_file(FILE) == ServiceConfig()


def test_every_setting_is_in_the_shipped_config_with_a_comment() -> None:
    text = FILE.read_text()
    for cls in (ServiceConfig, MonitorConfig, PolicyConfig, ForensicsConfig, SlackSettings):
        for f in dataclasses.fields(cls):
            if f.name in ("monitor", "slack", "policy", "forensics", "enabled"):
                continue
            line = re.search(rf"^#? ?{f.name} = .*$", text, flags=re.MULTILINE)
            assert line is not None, f"{cls.__name__}.{f.name} is missing from {FILE.name}"
            assert "#" in line.group(0).lstrip("# "), f"{f.name} has no comment"
    assert tomllib.loads(text).keys() == {"service", "monitor"}  # [slack] stays commented out
