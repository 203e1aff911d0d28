"""The error every request-body check raises: it names the field, the value and the fix."""

from __future__ import annotations

from spikewatch.errors import WireFormatError


class PayloadError(WireFormatError):
    """A request body is malformed; ``field`` is the JSON path of the first bad value."""

    def __init__(self, field: str, message: str, *, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.status = field, status


def bad(path: str, value: object, want: str) -> PayloadError:
    """A 422 for ``path``: its value (shortened) and what was expected instead."""
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return PayloadError(path, f"{path}={shown} is invalid: expected {want}")
