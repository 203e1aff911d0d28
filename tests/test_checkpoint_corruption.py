"""Single-file checkpoints: every corruption is a `CheckpointError`; no failed save leaves
a temp file behind; the rename is made durable by a directory fsync."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from spikewatch_hooks.guard import SpikeGuard
from spikewatch_hooks.state.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

FIX = "resume from an older checkpoint"
# Header flips: every bit of every header byte would be 8 x ~100 loads; these masks reach
# each bit position and the "whole byte" and "case" flips (hex digits, the magic word).
HEADER_MASKS = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF)


def _guard() -> SpikeGuard:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    guard = SpikeGuard(model=model, optimizer=opt, scheduler=sched, snapshot_every=2)
    for _ in range(4):
        x = torch.randn(5, 3)
        loss = model(x).pow(2).mean()
        loss.backward()
        guard.step(loss=loss)
        opt.zero_grad(set_to_none=True)
    return guard


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a real checkpoint: model, AdamW, scheduler, RNG and guard state."""
    path = tmp_path_factory.mktemp("good") / "ckpt.pt"
    save_checkpoint(path, _guard().engine.checkpoint_payload())
    return path.read_bytes()


def _header_length(data: bytes) -> int:
    return data.index(b"\n") + 1


def _refused(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` and load it; return the error, failing on anything else."""
    path.write_bytes(data)
    try:
        load_checkpoint(path)
    except CheckpointError as exc:
        return str(exc)
    except Exception as exc:  # the point of the test: nothing but CheckpointError
        pytest.fail(f"{type(exc).__name__} escaped for {data[:120]!r}: {exc}")
    pytest.fail(f"a damaged checkpoint loaded: {data[:120]!r}")


def _positions(start: int, stop: int, *, every: int) -> list[int]:
    """Every position in the first and last 1 KiB (the header; torch's zip headers and
    central directory), every ``every``-th in between."""
    ends = set(range(start, min(stop, start + 1024))) | set(range(max(start, stop - 1024), stop))
    return sorted(ends | set(range(start, stop, every)))


def _flips(data: bytes) -> Iterator[bytes]:
    header = _header_length(data)
    for i in range(header):
        for mask in HEADER_MASKS:
            yield data[:i] + bytes([data[i] ^ mask]) + data[i + 1 :]
    for i in _positions(header, len(data), every=3):  # the body: one bit each, all bits
        yield data[:i] + bytes([data[i] ^ 1 << (i % 8)]) + data[i + 1 :]


def test_every_flipped_byte_is_a_checkpoint_error(good: bytes, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    tried = 0
    for damaged in _flips(good):
        message = _refused(path, damaged)
        assert str(path) in message and FIX in message, message
        tried += 1
    header = _header_length(good)
    assert tried == header * len(HEADER_MASKS) + len(_positions(header, len(good), every=3))
    assert tried > 6000  # a real checkpoint (~19 KB: model, AdamW, RNG, guard), not a toy


def test_every_truncation_is_a_checkpoint_error(good: bytes, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    lengths = _positions(0, len(good), every=5)
    assert len(lengths) > 4000
    for length in lengths:
        message = _refused(path, good[:length])
        assert str(path) in message and FIX in message, message


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\n",
        b"\xff\xfe\xfd\n" + b"x" * 100,  # not UTF-8
        b"SPIKEWATCH-CKPT 1 \xff\xfe 12\nabc",
        b"SPIKEWATCH-CKPT 1 " + b"a" * 64 + b" twelve\nabc",
        b"SPIKEWATCH-CKPT 1 " + b"a" * 64 + b" -3\nabc",
        b"SPIKEWATCH-CKPT 1 " + b"a" * 64 + b" 1_2\nabcdefghijkl",
        b"SPIKEWATCH-CKPT 1 " + b"a" * 64 + b" 99999999999999999999999999\nabc",
        b"SPIKEWATCH-CKPT 1 " + b"A" * 64 + b" 3\nabc",  # upper-case hex: never written
        b"SPIKEWATCH-CKPT 1 abc 3\nabc",
        b"SPIKEWATCH-CKPT 1" + b" " * 10_000,  # no newline at all
        b"SPIKEWATCH-CKPT 2 " + b"a" * 64 + b" 3\nabc",
        b"PK\x03\x04" + b"\x00" * 200,  # a plain torch.save zip
    ],
)
def test_a_garbage_header_is_a_checkpoint_error(garbage: bytes, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    message = _refused(path, garbage)
    assert str(path) in message and FIX in message


def test_a_verified_payload_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    # The checksum matches but torch.load cannot read it (a foreign or future payload).
    path = tmp_path / "ckpt.pt"
    body = b"not a torch file"
    header = b"SPIKEWATCH-CKPT 1 %s %d\n" % (hashlib.sha256(body).hexdigest().encode(), len(body))
    message = _refused(path, header + body)
    assert "cannot be read by torch.load" in message


def test_a_damaged_checkpoint_leaves_the_guard_untouched(good: bytes, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x10
    path.write_bytes(bytes(damaged))
    guard = SpikeGuard(model=torch.nn.Linear(3, 1), optimizer=_sgd())
    before = {k: v.clone() for k, v in guard.engine.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        guard.resume(path)
    after = guard.engine.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert guard.step_count == 0


def _sgd() -> Any:
    return torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=0.1)


# -- failed saves -----------------------------------------------------------------------
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
    ids=["disk-full", "interrupted"],
)
def test_a_failed_write_removes_its_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})

    def fail(fd: int) -> None:
        raise error

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(CheckpointError if isinstance(error, OSError) else KeyboardInterrupt) as e:
        save_checkpoint(path, {"step": 2, "w": torch.ones(1000)})
    monkeypatch.undo()
    if isinstance(error, OSError):
        assert "No space left on device" in str(e.value) and "free space" in str(e.value)
    assert _leftovers(tmp_path) == []
    assert load_checkpoint(path)["step"] == 1  # the previous checkpoint is intact


def test_a_failed_rename_removes_its_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(src: Any, dst: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(CheckpointError, match="Permission denied"):
        save_checkpoint(tmp_path / "ckpt.pt", {"step": 2})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def _run(script: str, folder: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = textwrap.dedent(script).format(folder=str(folder))
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_file_size_limit_mid_write_leaves_no_temp_file(tmp_path: Path) -> None:
    # A real write that fails half way (EFBIG from RLIMIT_FSIZE: a full disk's twin that
    # needs no mount), in a child process so the limit touches nothing else.
    done = _run(
        """
        import resource, signal, torch
        from spikewatch_hooks.state.checkpoint import CheckpointError, save_checkpoint
        save_checkpoint("{folder}/ckpt.pt", {{"step": 1}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            save_checkpoint("{folder}/ckpt.pt", {{"w": torch.ones(1_000_000)}})
        except CheckpointError as exc:
            print("refused:", exc)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "File too large" in done.stdout
    assert _leftovers(tmp_path) == []
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 1


def test_the_temp_file_of_a_killed_save_is_removed_by_the_next(tmp_path: Path) -> None:
    killed = _run(
        """
        import os, signal, torch
        from spikewatch_hooks.state import checkpoint
        checkpoint.save_checkpoint("{folder}/ckpt.pt", {{"step": 1}})
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save_checkpoint("{folder}/ckpt.pt", {{"w": torch.ones(100_000)}})
        """,
        tmp_path,
    )
    assert killed.returncode == -signal.SIGKILL
    assert len(_leftovers(tmp_path)) == 1  # kill -9: nothing in the process can clean up
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 1  # the rename never happened
    live = tmp_path / f".ckpt.pt.tmp-{os.getppid()}"
    other = tmp_path / ".other.pt.tmp-1"
    live.write_bytes(b"a live writer's file")  # its process is alive: kept
    other.write_bytes(b"another checkpoint's")  # not this checkpoint's: kept
    save_checkpoint(tmp_path / "ckpt.pt", {"step": 2})
    assert _leftovers(tmp_path) == sorted([live.name, other.name])
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2


def test_the_rename_is_followed_by_a_directory_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    assert events == ["fsync file", "rename", "fsync dir"]
