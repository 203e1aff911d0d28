"""The trainer's client for `spikewatch serve`: batches records on a background thread.

The training thread only appends to a bounded in-memory queue (under a lock held for
microseconds) and picks up the decisions that came back; a daemon thread does every
socket operation. When the service is slow or down, records wait in the queue (the
newest are dropped and counted once it is full) and the sender retries with backoff,
resending a batch under the same sequence number so the service never ingests it
twice. Nothing here raises into training.
"""

from __future__ import annotations

import atexit
import http.client
import logging
import os
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from spikewatch.errors import bad_value
from spikewatch.http_queue import SendQueue
from spikewatch.http_wire import Batch, Connection, Rewind, decision_of, verdict
from spikewatch.records import Decision, StepRecord
from spikewatch.validation import check_run_id

log = logging.getLogger(__name__)

TOKEN_ENV = "SPIKEWATCH_TOKEN"


class HttpTransport(SendQueue):
    """A `Transport` to a `spikewatch serve` instance.

    Args:
        url: the service, e.g. ``http://monitor:9650``.
        run: the run id.
        token: bearer token (default: ``$SPIKEWATCH_TOKEN``).
        max_queue: records held while the service is unreachable; beyond it new
            records are dropped and counted in `dropped` (the queue keeps a contiguous
            stretch, and the batch in flight is never touched).
        batch_size: most records per request.
        flush_interval_s: longest a record waits before it is sent.
        timeout_s: per-request socket timeout.
        max_backoff_s: longest pause between retries while the service is down.

    Example:
        >>> t = HttpTransport("http://127.0.0.1:9", run="r", token="t", max_queue=2)
        >>> t.submit([StepRecord(run="r", step=i, loss=1.0) for i in range(3)])
        []
        >>> t.dropped, t.queued    # the service is not there: held, then dropped when full
        (1, 2)
        >>> t.close(timeout=0.1)
    """

    def __init__(
        self,
        url: str,
        *,
        run: str,
        token: str | None = None,
        max_queue: int = 100_000,
        batch_size: int = 2000,
        flush_interval_s: float = 1.0,
        timeout_s: float = 10.0,
        max_backoff_s: float = 10.0,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad_value(
                "monitor_url", url, "use http://host:port of a running `spikewatch serve`"
            )
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        if not token:
            raise bad_value("token", token, f"pass token= or set {TOKEN_ENV} (the service's token)")
        check_run_id("run", run)  # the service's own rule: refused there, every batch would be
        self.url, self.run = url, run
        base = f"{parts.path.rstrip('/')}/v1/runs/{urllib.parse.quote(run, safe='')}"
        self._parts, self._token, self._config_path = parts, token, f"{base}/config"
        self._conn = Connection(parts, path=f"{base}/records", token=token, timeout_s=timeout_s)
        super().__init__(max_queue=max_queue, batch_size=batch_size)
        self.flush_interval_s, self.timeout_s, self.max_backoff_s = (
            flush_interval_s,
            timeout_s,
            max_backoff_s,
        )
        self.client_id = uuid.uuid4().hex[:12]
        self._commands: deque[dict[str, Any]] = deque()
        self._seen: set[str] = set()
        self._threshold = float("inf")
        self._incidents = 0
        self.failures = 0
        self._logged: set[tuple[int, str]] = set()  # rejections already logged
        self._stop = False
        self._stopped = threading.Event()  # wakes the sender out of a backoff pause
        self._thread = threading.Thread(target=self._run, name="spikewatch-http", daemon=True)
        self._thread.start()
        # At exit only deliver: a run that ends by an exception must not look finished.
        atexit.register(self._at_exit)

    def __repr__(self) -> str:
        return (
            f"HttpTransport(url={self.url!r}, run={self.run!r}, sent={self.sent}, "
            f"queued={self.queued}, dropped={self.dropped}, failures={self.failures})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # A thread and a socket cannot travel to another process (Lightning's ddp_spawn
        # pickles callbacks): say so instead of a pickling error about a lock.
        raise TypeError(
            "an HttpTransport cannot be pickled into another process: pass monitor_url= "
            "(and token=) to the guard or callback instead, which makes the client in the "
            "process that trains (rank 0 only)"
        )

    # -- the training thread ------------------------------------------------------------
    def submit(self, records: Sequence[StepRecord]) -> list[Decision]:
        """Queue records (never blocks on the network); return the commands that arrived.

        This is the client used alone, with the service deciding (a log shipper, say);
        a trainer hook wraps it in a `ServiceTransport`, whose own monitor decides.
        """
        self._enqueue(records)
        return [decision_of(cmd) for cmd in self.take_commands() if cmd["action"] != "veto"]

    def report(
        self,
        records: Sequence[StepRecord],
        decisions: Sequence[Decision],
        events: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Queue records, the decisions the trainer's own monitor took on them, and what
        the trainer did about proposals and commands (``events``)."""
        with self._lock:
            if self._reports is None:
                self._reports = []
            self._reports.extend(d.to_json() for d in decisions)
            self._events.extend(events)
        self._enqueue(records)

    def pending_commands(self) -> int:
        """Operator commands that arrived and were not taken yet (no lock: a hint)."""
        return len(self._commands)

    def take_commands(self) -> list[dict[str, Any]]:
        """The operators' commands that arrived, oldest first; each is acknowledged to the
        service with the next batch (it is applied at this step boundary)."""
        with self._lock:
            out = list(self._commands)
            self._commands.clear()
            self._acks.extend(cmd["id"] for cmd in out)
        return out

    def configure(self, config: dict[str, Any], restorable: list[int] | None = None) -> None:
        """Tell the service the trainer's effective settings (with the next batch) and
        which steps it can restore, so it can refuse an operator rollback it cannot do."""
        with self._lock:
            if config:
                self._config = config
            if restorable is not None:
                self._restorable = list(restorable)

    def fetch_config(self, timeout: float = 3.0) -> dict[str, Any] | None:
        """Ask the service for this run's settings (``GET /v1/runs/{run}/config``); None
        when it does not answer in ``timeout`` seconds or refuses (the caller says so)."""
        conn = Connection(self._parts, path=self._config_path, token=self._token, timeout_s=timeout)
        try:
            status, payload = conn.request("GET", self._config_path)
        except (OSError, http.client.HTTPException) as exc:
            log.warning("spikewatch: monitor service %s unreachable (%s)", self.url, exc)
            return None
        finally:
            conn.reset()
        if status != 200 or not isinstance(payload, dict):
            log.warning("spikewatch: monitor service answered %d for the run's config", status)
            return None
        return payload

    def detector_state(self) -> dict[str, Any]:
        """Detection state lives in the service; a snapshot keeps nothing of it."""
        return {}

    def rewind(self, state: dict[str, Any]) -> None:
        """The trainer rolled back: the next records tell the service to rewind too."""
        with self._lock:
            self._queue.append(Rewind())

    def incidents(self) -> int:
        """Incidents the service has opened for this run (as of the last response)."""
        return self._incidents

    def skip_threshold(self) -> float:
        """The service's grad-norm skip threshold (inf until it answered once)."""
        return self._threshold

    @property
    def queued(self) -> int:
        """Records waiting to be sent."""
        return self._queued

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record was delivered; False if ``timeout`` passed first."""
        return self._wait(lambda: self._queued == 0, timeout)

    def finish(self, timeout: float = 10.0) -> bool:
        """Deliver what is queued and tell the service the run ended (so it is not taken
        for a stall); False if ``timeout`` passed first. Records after it resume the run."""
        self._finishing = True
        return self._wait(lambda: self._queued == 0 and self._finish_sent, timeout)

    def _wait(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if done():
                    return True
            self._wake.set()
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued and finish the run; stop the sender. Returns within
        ``timeout`` seconds, delivered or not (a request still in flight is abandoned:
        the sender is a daemon thread)."""
        if self._stop:
            return
        deadline = time.monotonic() + timeout
        if self.refused is None:
            self.finish(timeout)
        self._halt()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive():
            self._conn.reset()

    def _halt(self) -> None:
        self._stop = True
        self._stopped.set()
        self._wake.set()

    def _at_exit(self) -> None:
        if not self._stop:
            self.flush(2.0)
            self._halt()

    # -- the sender thread --------------------------------------------------------------
    def _run(self) -> None:
        batch: Batch | None = None
        backoff = 0.1
        while not self._stop:
            try:
                if batch is None:
                    self._wake.wait(self.flush_interval_s)
                    self._wake.clear()
                    batch = self._next_batch()
                    if batch is None:
                        continue
                outcome = self._send(batch)
            except Exception:  # a bug here must not end delivery for the rest of the run
                log.exception("spikewatch: the monitor client failed; retrying")
                outcome = "retry"
            if outcome == "retry":
                self.failures += 1
                self._stopped.wait(backoff)  # the service is down or slow: keep it, retry
                backoff = min(backoff * 2.0, self.max_backoff_s)
                continue
            assert batch is not None
            if outcome == "sent":
                self._commit(batch)
            elif outcome == "refused":
                self._refuse_all()
                return
            else:
                self._drop(batch)
            batch, backoff = None, 0.1
            if self._queued >= self.batch_size:
                self._wake.set()

    def _send(self, batch: Batch) -> str:
        """POST one batch: ``sent``, ``rejected`` (never acceptable) or ``retry``."""
        try:
            body = batch.encode(client=self.client_id, dropped=self.dropped)
        except (TypeError, ValueError) as exc:  # a value JSON cannot carry
            log.error("spikewatch: a batch of records cannot be encoded (%s); dropped", exc)
            return "rejected"
        try:
            status, payload = self._conn.post(body)
        except (OSError, http.client.HTTPException) as exc:
            self._conn.reset()
            log.warning("spikewatch: monitor service %s unreachable (%s); retrying", self.url, exc)
            return "retry"
        if status == 200:
            self._handle(payload)
            return "sent"
        outcome, why = verdict(status, payload)
        self.rejected_field = str(payload.get("field", "")) if isinstance(payload, dict) else ""
        if outcome == "refused":
            self.refused = status
        if outcome != "retry":
            self.failures += 1
            key = (status, str(payload.get("field", "")) if isinstance(payload, dict) else "")
            # Once per kind of refusal: the next batches would say the same thing.
            level = logging.DEBUG if key in self._logged else logging.ERROR
            self._logged.add(key)
            log.log(level, "spikewatch: monitor service %s refused run %r (%d: %s): %s",
                    self.url, self.run, status, _error_of(payload), why)  # fmt: skip
            return outcome
        log.warning("spikewatch: monitor service answered %d (%s); retrying", status, payload)
        return "retry"

    def _handle(self, payload: Any) -> None:
        """Take a 200 answer: the skip threshold, the incidents, the commands."""
        if not isinstance(payload, dict):  # a proxy's page, say: the batch was not taken
            raise http.client.HTTPException(f"not a spikewatch answer: {str(payload)[:80]!r}")
        threshold = payload.get("skip_threshold")
        self._threshold = float("inf") if threshold is None else float(threshold)
        self._incidents = int(payload.get("incidents", self._incidents))
        vetoed = [{"id": i, "action": "veto"} for i in payload.get("vetoed", [])]
        for cmd in [*payload.get("commands", []), *vetoed]:
            if cmd["id"] in self._seen:
                continue
            self._seen.add(cmd["id"])
            with self._lock:
                self._commands.append(cmd)


def _error_of(payload: Any) -> str:
    return str(payload.get("error", payload)) if isinstance(payload, dict) else str(payload)
