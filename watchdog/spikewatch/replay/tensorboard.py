"""Read scalars from TensorBoard event files with the standard library only.

An event file is a sequence of TFRecords (``uint64`` length, masked CRC-32C of the
length, payload, masked CRC-32C of the payload), each payload an ``Event`` protobuf.
Only the few protobuf fields a scalar needs are decoded here, so replaying a run never
needs tensorflow, tensorboard or protobuf installed.

Example:
    >>> import io, struct
    >>> payload = b"\\x10\\x07"  # Event{step: 7}, no summary
    >>> length = struct.pack("<Q", len(payload))
    >>> record = (length + struct.pack("<I", masked_crc32c(length)) + payload
    ...           + struct.pack("<I", masked_crc32c(payload)))
    >>> [offset for offset, _ in iter_records(io.BytesIO(record), name="events")]
    [0]
    >>> list(iter_records(io.BytesIO(record[:-3]), name="events"))  # writer killed mid-record
    []
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from spikewatch.errors import ReplayInputError

_HEADER = struct.Struct("<QI")
_U32 = struct.Struct("<I")
_DT_FLOAT, _DT_DOUBLE = 1, 2
_ITEM_FORMAT = {_DT_FLOAT: "<f", _DT_DOUBLE: "<d"}


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses (zlib only has plain CRC-32).

    Example:
        >>> hex(crc32c(b"123456789"))
        '0xe3069283'
    """
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | memoryview) -> int:
    """The rotated, offset CRC-32C that TFRecord stores (so CRCs of CRCs stay strong).

    Example:
        >>> masked_crc32c(b"")
        2726488792
    """
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class ScalarEvent:
    """One scalar value logged under ``tag`` at ``step``; ``record`` locates it for messages."""

    tag: str
    step: int
    value: float
    wall_time: float
    record: int


def _corrupt(name: str, index: int, offset: int, what: str) -> ReplayInputError:
    if index == 0:
        return ReplayInputError(
            f"{name} record 0: {what}, so this is not a TensorBoard event file; "
            "pass an events.out.tfevents.* file or choose another --format"
        )
    return ReplayInputError(
        f"{name} record {index} (byte {offset}): {what}, so the file is corrupt from here; "
        f"copy it again, or keep the part before: head -c {offset} {name} > fixed.tfevents"
    )


def iter_records(stream: BinaryIO, *, name: str) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, payload)`` for each complete record whose length checksum holds.

    A truncated final record (the writer was killed mid-write), or a zero-filled tail
    (what a crash can leave on some filesystems), ends the stream silently: the records
    before it are good data. A wrong length checksum raises `ReplayInputError`. Payload
    checksums are left to the caller (`check_payload`), who knows which records matter.
    """
    index = offset = 0
    while True:
        header = stream.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        length, length_crc = _HEADER.unpack(header)
        if masked_crc32c(header[:8]) != length_crc:
            if not any(header) and not any(stream.read()):
                return
            raise _corrupt(name, index, offset, "the length checksum does not match")
        body = stream.read(length + _U32.size)
        if len(body) < length + _U32.size:
            return
        yield offset, body
        index += 1
        offset += _HEADER.size + len(body)


def check_payload(body: bytes, *, name: str, index: int, offset: int) -> memoryview:
    """Return the payload of a record ``body`` (payload + CRC) after checking its CRC."""
    payload = memoryview(body)[: -_U32.size]
    (expected,) = _U32.unpack_from(body, len(body) - _U32.size)
    if masked_crc32c(payload) != expected:
        raise _corrupt(name, index, offset, "the payload checksum does not match")
    return payload


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 70:
        if pos >= len(buf):
            raise ValueError("a number runs past the end of the message")
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ValueError("a varint is longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield ``(field number, wire type, value)``; ints for varints, bytes views otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            number, pos = _varint(buf, pos)
            yield key >> 3, wire, number
            continue
        if wire == 2:
            size, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos + size > len(buf):
            raise ValueError("a field runs past the end of the message")
        yield key >> 3, wire, buf[pos : pos + size]
        pos += size


def _floats(wire: int, value: int | memoryview, fmt: str) -> list[float]:
    """Values of a repeated float/double field, packed (wire type 2) or not."""
    width = struct.calcsize(fmt)
    if isinstance(value, int) or len(value) % width or (wire != 2 and len(value) != width):
        raise ValueError(f"a repeated {'float' if width == 4 else 'double'} field is malformed")
    return [v for (v,) in struct.iter_unpack(fmt, value)]


def _elements(shape: memoryview) -> int:
    count = 1
    for number, _, dim in _fields(shape):
        if number == 2 and isinstance(dim, memoryview):
            for field, _, size in _fields(dim):
                if field == 1 and isinstance(size, int):
                    count *= size
    return count


def _tensor_scalar(tensor: memoryview) -> float | None:
    """The value of a one-element float32/float64 tensor, else None (text, histograms...)."""
    dtype, elements, values = 0, 1, []
    content: memoryview | None = None
    for number, wire, value in _fields(tensor):
        if number == 1 and isinstance(value, int):
            dtype = value
        elif number == 2 and isinstance(value, memoryview):
            elements = _elements(value)
        elif number == 4 and isinstance(value, memoryview):
            content = value
        elif number in (5, 6):
            values += _floats(wire, value, "<f" if number == 5 else "<d")
    fmt = _ITEM_FORMAT.get(dtype)
    if fmt is None or elements != 1:
        return None
    if content is not None and len(content) == struct.calcsize(fmt):
        return float(struct.unpack(fmt, content)[0])
    return values[0] if len(values) == 1 else None


def _value_scalar(value: memoryview) -> tuple[str, float] | None:
    tag, number_value = "", None
    for number, _, field in _fields(value):
        if number == 1 and isinstance(field, memoryview):
            tag = str(field, "utf-8", "replace")
        elif number == 2 and isinstance(field, memoryview) and len(field) == 4:
            number_value = float(struct.unpack("<f", field)[0])
        elif number == 8 and isinstance(field, memoryview):
            number_value = _tensor_scalar(field)
    return None if number_value is None else (tag, number_value)


def decode_event(payload: memoryview) -> tuple[int, float, list[tuple[str, float]]]:
    """Decode an ``Event`` into ``(step, wall_time, [(tag, value), ...])`` of its scalars.

    Raises:
        ValueError: the payload is not a well-formed protobuf message.
    """
    step, wall_time, scalars = 0, float("nan"), []
    for number, _, value in _fields(payload):
        if number == 1 and isinstance(value, memoryview) and len(value) == 8:
            wall_time = float(struct.unpack("<d", value)[0])
        elif number == 2 and isinstance(value, int):
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 5 and isinstance(value, memoryview):
            for field, _, item in _fields(value):
                if field == 1 and isinstance(item, memoryview):
                    scalar = _value_scalar(item)
                    if scalar is not None:
                        scalars.append(scalar)
    return step, wall_time, scalars


def iter_scalars(stream: BinaryIO, *, name: str) -> Iterator[ScalarEvent]:
    """Yield every float scalar (``simple_value`` or a scalar tensor) of one event file.

    Example:
        >>> import io
        >>> list(iter_scalars(io.BytesIO(b""), name="events.out.tfevents.1"))
        []
    """
    for index, (offset, body) in enumerate(iter_records(stream, name=name)):
        payload = memoryview(body)[: -_U32.size]
        try:
            step, wall_time, scalars = decode_event(payload)
        except ValueError as exc:
            check_payload(body, name=name, index=index, offset=offset)
            raise ReplayInputError(
                f"{name} record {index} (byte {offset}): not a TensorBoard event ({exc}); "
                "pass an events.out.tfevents.* file written by TensorBoard or tensorboardX"
            ) from None
        if scalars:
            # Only records that yield data are checksummed: images and histograms are
            # skipped unread, and a pure-Python CRC over them would dominate the run time.
            check_payload(body, name=name, index=index, offset=offset)
        for tag, value in scalars:
            yield ScalarEvent(tag=tag, step=step, value=value, wall_time=wall_time, record=index)


def find_event_files(path: str | os.PathLike[str]) -> list[Path]:
    """The event files of one run: ``path`` itself, or the ``*tfevents*`` files of a folder.

    A folder without event files is searched recursively, as long as all files found
    sit in one sub-folder (one run); older files come first (their names start with the
    creation time).
    """
    root = Path(path)
    if not root.is_dir():
        return [root]
    files = sorted(p for p in root.iterdir() if "tfevents" in p.name and p.is_file())
    if files:
        return files
    nested = sorted(p for p in root.rglob("*tfevents*") if p.is_file())
    folders = sorted({str(p.parent.relative_to(root)) for p in nested})
    if not nested:
        raise ReplayInputError(
            f"{root}: no events.out.tfevents.* file in this folder; "
            "pass the run's log folder or one event file"
        )
    if len(folders) > 1:
        shown = ", ".join(folders[:5]) + (", ..." if len(folders) > 5 else "")
        raise ReplayInputError(
            f"{root}: event files of {len(folders)} runs ({shown}); pass one of these folders"
        )
    return nested
