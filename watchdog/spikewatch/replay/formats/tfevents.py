"""TensorBoard curves: the loss tag's scalars, with grad norm and lr joined by step."""

from __future__ import annotations

from pathlib import Path

from spikewatch.errors import ReplayInputError
from spikewatch.replay import tensorboard
from spikewatch.replay.formats.builder import CurveBuilder, pick
from spikewatch.replay.model import Curve
from spikewatch.replay.tensorboard import ScalarEvent


def _series(files: list[Path]) -> dict[str, list[tuple[Path, ScalarEvent]]]:
    series: dict[str, list[tuple[Path, ScalarEvent]]] = {}
    for file in files:
        try:
            stream = file.open("rb")
        except OSError as exc:
            raise ReplayInputError(
                f"{file}: cannot read ({exc.strerror}); check the path"
            ) from None
        with stream:
            for event in tensorboard.iter_scalars(stream, name=str(file)):
                series.setdefault(event.tag, []).append((file, event))
    return series


def read_tensorboard(path: Path, name: str) -> Curve:
    """Read an event file, or the event files of one run folder (oldest first).

    Example (one record by hand: ``Event{step: 7, summary: {value: {tag: "loss",
    simple_value: 2.5}}}``; real files come from TensorBoard or tensorboardX):
        >>> import pathlib, struct, tempfile
        >>> from spikewatch.replay.tensorboard import masked_crc32c
        >>> value = b"\\x0a\\x04loss\\x15" + struct.pack("<f", 2.5)
        >>> payload = b"\\x10\\x07\\x2a" + bytes([len(value) + 2, 0x0A, len(value)]) + value
        >>> length = struct.pack("<Q", len(payload))
        >>> record = (length + struct.pack("<I", masked_crc32c(length)) + payload
        ...           + struct.pack("<I", masked_crc32c(payload)))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp, "events.out.tfevents.1")
        ...     _ = path.write_bytes(record)
        ...     curve = read_tensorboard(path, str(path))
        >>> curve.steps, curve.loss, curve.grad_norm
        ([7], [2.5], None)
    """
    files = tensorboard.find_event_files(path)
    if all(file.stat().st_size == 0 for file in files):
        raise ReplayInputError(f"{name}: the file is empty; point at the file the run logged to")
    series = _series(files)
    loss_tag = pick(series, "loss")
    if loss_tag is None:
        found = ", ".join(sorted(series)[:8]) or "none"
        raise ReplayInputError(
            f"{name}: no loss tag (scalar tags found: {found}); log the loss under a tag "
            "named loss, train/loss, train_loss or Loss/train"
        )
    extra = {role: pick(series, role) for role in ("grad_norm", "lr")}
    by_step = {
        role: {e.step: e.value for _, e in series[tag]} for role, tag in extra.items() if tag
    }
    build = CurveBuilder(name="", unit="record")
    for file, event in series[loss_tag]:
        row: dict[str, object] = {"step": event.step, "loss": event.value}
        # A step the grad norm was not logged at is no value (None), not a NaN.
        row.update({role: values.get(event.step) for role, values in by_step.items()})
        build.add(f"{file} record {event.record} (tag {loss_tag!r})", row)
    return build.curve(str(path), "tensorboard", "log the loss with add_scalar")
