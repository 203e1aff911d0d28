"""The guard's automatic disk checkpoints: a "latest" one and a "last good" one.

Every ``checkpoint_every`` steps the guard writes ``spikewatch-latest.pt`` (one process)
or the ``spikewatch-latest`` folder (torch.distributed, DCP). A checkpoint taken while
an incident is open (the monitor holds a candidate it has not decided yet) is suspect:
the bad stretch may already be in it. So before the first such save overwrites a
``latest`` taken with no incident open, that one is renamed to ``spikewatch-good(.pt)``
(a rename: no copy), and later saves inside the incident only replace ``latest``.

After a ``kill -9`` inside an incident the process restarts from ``latest``, its ring
holds only the resume step, and the rollback the incident calls for reaches back past
it: `DiskCheckpoints.restore_at_or_before` then loads the newest of ``latest`` and
``good`` at or before the target, in the running process.

``spikewatch-checkpoints.json`` beside them records whether ``latest`` was taken with
no incident open (written after each save; a crash between the two only means one
promotion too few or too many, never a lost or damaged checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spikewatch_hooks.state.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)

if TYPE_CHECKING:  # the engine calls these functions: no import back up at run time
    from spikewatch_hooks.core.engine import GuardEngine

log = logging.getLogger("spikewatch_hooks")
INDEX = "spikewatch-checkpoints.json"


def incident_open(engine: GuardEngine) -> bool:
    """Whether the engine's monitor holds a candidate it has not decided yet."""
    monitor = getattr(engine.transport, "monitor", None)
    return bool(getattr(monitor, "undecided", False))


class DiskCheckpoints:
    """``latest`` and ``good`` checkpoints in ``directory`` (see the module docstring).

    Example:
        >>> import tempfile, torch
        >>> from spikewatch_hooks.guard import SpikeGuard
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     guard = SpikeGuard(model, opt, checkpoint_dir=tmp, checkpoint_every=1)
        ...     disk = guard.engine.disk
        ...     disk.save_auto(guard.engine)
        ...     [(p.name, step) for p, step in disk.available(guard.engine)]
        [('spikewatch-latest.pt', 0)]
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._pending: tuple[Future[Path], bool] | None = None

    def __repr__(self) -> str:
        return f"DiskCheckpoints({os.fspath(self.directory)!r})"

    def paths(self, engine: GuardEngine) -> tuple[Path, Path]:
        """(latest, good) for this engine: folders under torch.distributed, else files."""
        suffix = "" if engine.lockstep is not None else ".pt"
        return (
            self.directory / f"spikewatch-latest{suffix}",
            self.directory / f"spikewatch-good{suffix}",
        )

    # -- saving ---------------------------------------------------------------------------
    def save_auto(self, engine: GuardEngine) -> Future[Path] | None:
        """Write ``latest``; first keep a clean ``latest`` as ``good`` if an incident is
        open now. Distributed: returns the background save's future. Raises
        `CheckpointError` / ``OSError`` (the guard counts and logs them)."""
        suspect = incident_open(engine)
        latest, good = self.paths(engine)
        if engine.lockstep is None:
            self._promote(latest, good, suspect)
            save_checkpoint(latest, engine.checkpoint_payload())
            self._write_index(latest_clean=not suspect)
            return None
        from spikewatch_hooks.distributed.checkpoint import (  # noqa: PLC0415
            save_distributed,
            wait_for_save,
        )

        wait_for_save(engine)  # the rename must not race a background write
        if engine.reporting:
            self._settle_pending()
            self._promote(latest, good, suspect)
        done = save_distributed(engine, latest, async_save=True)
        self._pending = (done, suspect)
        return done

    def _settle_pending(self) -> None:
        # Recorded here, on the training thread, once the previous background save is
        # known to be done: a done-callback could run after this save's promotion check.
        if self._pending is not None:
            done, suspect = self._pending
            self._pending = None
            if done.done() and done.exception() is None:
                self._write_index(latest_clean=not suspect)

    def _promote(self, latest: Path, good: Path, suspect: bool) -> None:
        if not (suspect and latest.exists() and self._index().get("latest_clean", False)):
            return
        if latest.is_dir():
            old = good.with_name(f".{good.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if good.exists():
                os.replace(good, old)
            os.replace(latest, good)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(latest, good)
        self._write_index(latest_clean=False)
        log.info("spikewatch: an incident is open; kept the checkpoint before it as %s", good)

    def _index(self) -> dict[str, Any]:
        try:
            data = json.loads((self.directory / INDEX).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_index(self, **values: Any) -> None:
        body = json.dumps({**self._index(), **values}).encode()
        atomic_write(self.directory / INDEX, (body,))

    # -- the deep path of a rollback ------------------------------------------------------
    def available(self, engine: GuardEngine) -> list[tuple[Path, int]]:
        """(path, step) of each readable automatic checkpoint, newest step first."""
        found = []
        for path in self.paths(engine):
            step = _step_of(path)
            if step is not None:
                found.append((path, step))
        return sorted(found, key=lambda item: -item[1])

    def restore_at_or_before(self, engine: GuardEngine, target: int) -> Path | None:
        """Load the newest checkpoint at or before step ``target`` into the live objects;
        the live skip ledger and counters are kept (the file's older ledger must not
        erase newer skips). Returns its path, or None when none is that old."""
        for path, step in self.available(engine):
            if step <= target:
                self.load_keeping_ledger(engine, path)
                return path
        return None

    def load_keeping_ledger(self, engine: GuardEngine, path: Path) -> None:
        """Load the checkpoint at ``path``; keep the live ledger and counters."""
        ledger, stats = engine.ledger.state_dict(), Counter(engine.stats)
        if path.is_dir():
            from spikewatch_hooks.distributed.checkpoint import load_distributed  # noqa: PLC0415

            load_distributed(engine, path)
        else:
            engine.load_checkpoint_payload(load_checkpoint(path))
        engine.ledger.load_state_dict(ledger)
        engine.stats = stats


def _step_of(path: Path) -> int | None:
    """The guard step a checkpoint holds (None: missing or unreadable, logged)."""
    if not path.exists():
        return None
    try:
        if path.is_dir():
            from spikewatch_hooks.distributed.files import read_header  # noqa: PLC0415

            return int(read_header(path)["guard"]["step"])
        return int(load_checkpoint(path)["guard"]["step"])
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        log.warning("spikewatch: cannot use %s for a deep rollback (%s)", path, exc)
        return None
