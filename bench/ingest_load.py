"""The load side of ``bench/ingest.py``: synthetic runs, pre-built requests, the HTTP client.

Every request is built (JSON body and HTTP head) before any clock starts, so the load
generator only writes bytes and reads the answers: it shares the host's CPUs with the
server. One asyncio event loop (uvloop when installed) drives one persistent HTTP/1.1
keep-alive connection per run: measured on the 2-core development host at saturation,
about 200 µs of client CPU per 500-record request, against about 400 µs for a thread
per connection with ``http.client`` (thread switches, header handling in Python).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from spikewatch.records import StepRecord

#: Spikes per step of a synthetic run (a few per 10k steps).
SPIKE_RATE = 1 / 4000
#: Steps of the learning-rate schedule: warm-up, then a cosine over a long horizon.
LR_WARMUP, LR_HORIZON, LR_PEAK = 2000, 1_000_000, 3e-4
T = TypeVar("T")
Starter = Callable[["Phase", float], list[Coroutine[Any, Any, None]]]


@dataclass(frozen=True, slots=True)
class Curve:
    """One synthetic run: per step loss, grad norm and lr; the spike steps (ground truth)."""

    loss: list[float]
    grad_norm: list[float]
    lr: list[float]
    spikes: list[int]


def synthetic_curve(seed: int, n: int) -> Curve:
    """A falling loss with Gaussian noise and a few one-step spikes, plus grad norm and lr.

    Each quantity has its own generator, so the first ``m`` steps do not depend on ``n``.

    Example:
        >>> a, b = synthetic_curve(3, 5000), synthetic_curve(3, 20000)
        >>> [getattr(a, k) == getattr(b, k)[:5000] for k in ("loss", "grad_norm", "lr")]
        [True, True, True]
        >>> len(b.spikes) > 0, a.loss[0] > b.loss[-1]
        (True, True)
    """
    shape = np.random.default_rng([seed, 0])
    floor, drop, tau = shape.uniform(1.8, 2.6), shape.uniform(3.0, 6.0), shape.uniform(3e3, 2e4)
    t = np.arange(n, dtype=np.float64)
    level = floor + drop * np.exp(-t / tau)
    loss = level * (1.0 + np.random.default_rng([seed, 1]).normal(0.0, 0.01, n))
    grad = (
        0.8
        + 0.6 * np.exp(-t / tau)
        + 0.05 * np.abs(np.random.default_rng([seed, 2]).normal(size=n))
    )
    spikes = np.flatnonzero((np.random.default_rng([seed, 3]).random(n) < SPIKE_RATE) & (t >= 500))
    loss[spikes] += level[spikes] * np.random.default_rng([seed, 4]).uniform(0.5, 1.0, n)[spikes]
    grad[spikes] *= np.random.default_rng([seed, 5]).uniform(3.0, 8.0, n)[spikes]
    warm = np.minimum(1.0, (t + 1) / LR_WARMUP)
    lr = LR_PEAK * warm * (0.1 + 0.45 * (1.0 + np.cos(np.pi * np.minimum(t / LR_HORIZON, 1.0))))
    return Curve(loss.tolist(), grad.tolist(), lr.tolist(), spikes.tolist())


def step_records(run: str, seed: int, n: int) -> list[StepRecord]:
    """The first ``n`` records of a synthetic run, as the service builds them from a request."""
    c = synthetic_curve(seed, n)
    return [StepRecord(run, s, c.loss[s], c.grad_norm[s], c.lr[s]) for s in range(n)]


def build_requests(run: str, seed: int, *, batches: int, batch: int, token: str) -> list[bytes]:
    """Complete HTTP requests (head and JSON body) of a run's first ``batches`` batches.

    Example:
        >>> req = build_requests("r", 0, batches=2, batch=3, token="t")[1]
        >>> head, body = req.split(b"\\r\\n\\r\\n")
        >>> [r["step"] for r in json.loads(body)["records"]], json.loads(body)["seq"]
        ([3, 4, 5], 1)
    """
    c = synthetic_curve(seed, batches * batch)
    head = (
        f"POST /v1/runs/{run}/records HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
    ).encode()
    out = []
    for k in range(batches):
        steps = range(k * batch, (k + 1) * batch)
        records = [
            {"step": s, "loss": c.loss[s], "grad_norm": c.grad_norm[s], "lr": c.lr[s]}
            for s in steps
        ]
        body = json.dumps({"records": records, "seq": k, "client": f"bench-{run}"}, allow_nan=True)
        data = body.encode()
        out.append(head + b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return out


class Connection:
    """One keep-alive HTTP/1.1 connection: write a pre-built request, read its response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        """Connect to the service on loopback."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send ``request``; return the response's status and body."""
        self.writer.write(request)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        start = head.lower().find(b"content-length:")
        length = 0 if start < 0 else int(head[start + 15 : head.index(b"\r\n", start)])
        return int(head[9:12]), await self.reader.readexactly(length)

    def close(self) -> None:
        """Close the socket."""
        self.writer.close()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of sorted values (NaN when empty).

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 99)
        (2.0, 4.0)
    """
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Phase:
    """What one load phase saw: per-request latencies, acknowledged records, errors."""

    batch: int
    latencies_ms: list[float] = field(default_factory=list)
    records: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    exhausted_runs: int = 0
    """Runs that ran out of pre-built requests before the phase ended (then they stop)."""

    def check(self, status: int, body: bytes, latency_s: float) -> None:
        """Count a response: 200 with ``accepted`` equal to the batch size, else an error."""
        self.latencies_ms.append(latency_s * 1e3)
        accepted = json.loads(body).get("accepted") if status == 200 else None
        if accepted == self.batch:
            self.records += accepted
            return
        self.fail(f"{status}: {body[:200].decode(errors='replace')}")

    def fail(self, what: str) -> None:
        """Count an error; keep the first few descriptions."""
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)

    def summary(self, wall_s: float) -> dict[str, Any]:
        """Records/s over ``wall_s`` and latency percentiles, as JSON types."""
        lat = sorted(self.latencies_ms)
        return {
            "records_per_s": self.records / wall_s if wall_s > 0 else 0.0,
            "records": self.records,
            "requests": len(lat),
            "wall_s": wall_s,
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
            "max_ms": lat[-1] if lat else math.nan,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "exhausted_runs": self.exhausted_runs,
        }


@dataclass
class RunLoad:
    """One run's connection, its pre-built requests and the index of the next one to send."""

    conn: Connection
    requests: list[bytes]
    next: int = 0


async def _send(run: RunLoad, ph: Phase) -> tuple[int, bytes] | None:
    """The run's next request and its answer; None (an error counted) if the connection
    broke, after which the run stops: its connection's state is unknown."""
    try:
        return await run.conn.exchange(run.requests[run.next])
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        ph.fail(f"request {run.next}: {exc!r}")
        return None


async def closed_loop(run: RunLoad, stop: int, until: float, ph: Phase) -> None:
    """Send the run's next request as soon as the previous answer arrived, until the clock
    reaches ``until`` or the run reaches request ``stop``."""
    clock = time.perf_counter
    while clock() < until:
        if run.next >= stop:
            ph.exhausted_runs += 1
            return
        start = clock()
        answer = await _send(run, ph)
        if answer is None:
            return
        ph.check(*answer, clock() - start)
        run.next += 1


async def open_loop(run: RunLoad, count: int, first_due: float, interval: float, ph: Phase) -> None:
    """Send the run's next ``count`` requests on a fixed schedule. Latency counts from the
    scheduled time, so a request that waits for the previous answer (queueing) is charged
    for the wait, and so is the event loop's timer slack (about a millisecond)."""
    clock = time.perf_counter
    for k in range(count):
        due = first_due + k * interval
        if due > clock():
            await asyncio.sleep(due - clock())
        answer = await _send(run, ph)
        if answer is None:
            return
        ph.check(*answer, clock() - due)
        run.next += 1


@dataclass(frozen=True, kw_only=True)
class LoadPlan:
    """How the HTTP phases load the service (the requests are built to match it)."""

    batch: int
    seconds: float
    rate: float
    """Offered records/s of the open-loop phase, over all runs."""
    warmup_batches: int
    saturation_batches: int
    """Requests built per run for the closed-loop phase (it stops early if they run out)."""
    offered_batches: int
    """Batches per run in the open-loop phase: the last ones of each run's requests."""


async def _timed(
    start: Starter, batch: int, pid: int, *, lead_s: float, floor_s: float
) -> dict[str, Any]:
    """Run one phase's coroutines; its summary with wall time, server and client CPU."""
    ph = Phase(batch)
    cpu, own = process_cpu_s(pid), time.process_time()
    t0 = time.perf_counter() + lead_s
    await asyncio.gather(*start(ph, t0))
    wall = max(floor_s, time.perf_counter() - t0)
    cpu, own = process_cpu_s(pid) - cpu, time.process_time() - own
    out = ph.summary(wall)
    return out | {
        "server_cpu_core_share": cpu / wall,
        "server_cpu_us_per_record": cpu / max(1, out["records"]) * 1e6,
        "client_cpu_core_share": own / wall,
        "client_cpu_us_per_request": own / max(1, out["requests"]) * 1e6,
    }


async def http_phases(port: int, pid: int, requests: list[list[bytes]], p: LoadPlan) -> Any:
    """Warm-up, saturation and offered load, one connection per run; each phase's summary."""
    conns = await asyncio.gather(*(Connection.open(port) for _ in requests))
    runs = [RunLoad(c, r) for c, r in zip(conns, requests, strict=True)]
    warmup = await _timed(
        lambda ph, t0: [closed_loop(r, p.warmup_batches, math.inf, ph) for r in runs],
        p.batch, pid, lead_s=0.0, floor_s=0.0,
    )  # fmt: skip
    warmup["exhausted_runs"] = 0  # the warm-up ends by running out of its batches
    saturation = await _timed(
        lambda ph, t0: [
            closed_loop(r, len(r.requests) - p.offered_batches, t0 + p.seconds, ph) for r in runs
        ],
        p.batch, pid, lead_s=0.0, floor_s=0.0,
    )  # fmt: skip
    interval = p.batch * len(runs) / p.rate  # each run's period; the runs' sends interleave
    offered = await _timed(
        lambda ph, t0: [
            open_loop(r, p.offered_batches, t0 + i / len(runs) * interval, interval, ph)
            for i, r in enumerate(runs)
        ],
        p.batch, pid, lead_s=0.05, floor_s=p.seconds,
    )  # fmt: skip
    for c in conns:
        c.close()
    return {"warmup": warmup, "saturation": saturation, "offered": offered}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh event loop (uvloop's when installed: less client CPU)."""
    try:
        import uvloop  # noqa: PLC0415 - optional

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
