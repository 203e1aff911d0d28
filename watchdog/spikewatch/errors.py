"""One exception hierarchy for spikewatch; every message says what to do."""

from __future__ import annotations


class SpikewatchError(Exception):
    """Base class of every error spikewatch raises on purpose."""


class ConfigError(SpikewatchError, ValueError):
    """A setting has a bad value; the message names the field, the value and the fix."""


class WireFormatError(SpikewatchError, ValueError):
    """A wire payload (record, signal, decision, command) is malformed."""


class ReplayInputError(SpikewatchError):
    """A curve file cannot be read; the message names the file, the line or field and the fix."""


def bad_value(field: str, value: object, fix: str) -> ConfigError:
    """Build a `ConfigError` whose message names the field, the bad value and the fix.

    Example:
        >>> str(bad_value("window", 0, "use an integer >= 3"))
        'window=0 is invalid: use an integer >= 3'
    """
    return ConfigError(f"{field}={value!r} is invalid: {fix}")
