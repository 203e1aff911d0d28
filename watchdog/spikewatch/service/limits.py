"""Limits that apply before a request body is read: token, size, memory, auth-failure rate.

An ASGI middleware in front of every route, so nothing a client sends is parsed (or even
buffered) before it is allowed: a write without the right token is answered 401/403 from
its headers alone; a body is refused (413) from its ``Content-Length``, or while it
streams in, past the route's cap (ingest: ``max_body_bytes``; everything else
`SMALL_BODY_BYTES`); the bodies buffered at once are capped (503 with ``Retry-After``);
a client that keeps failing the token check is slowed down (429 with ``Retry-After``).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The cap on every body but ingest's (commands are a few hundred bytes).
SMALL_BODY_BYTES = 16 * 1024
#: Token-check failures a client host may make at once, and refilled per second.
AUTH_FAILURE_BURST, AUTH_FAILURES_PER_S = 60, 10.0


def token_problem(header: str | None, token: str) -> tuple[int, str] | None:
    """Why an ``Authorization`` header does not carry ``token``: (status, message), or None.

    Example:
        >>> token_problem("Bearer s3cret-token-0123", "s3cret-token-0123") is None
        True
        >>> token_problem(None, "t")[0], token_problem("Bearer x", "t")[0]
        (401, 403)
    """
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return 401, "missing bearer token: send Authorization: Bearer <token>"
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return 403, "wrong token: use the token the service was started with"
    return None


def needs_token(method: str, path: str) -> bool:
    """Every write, and a run's settings (``GET /v1/runs/{run}/config``)."""
    if method not in ("GET", "HEAD", "OPTIONS"):
        return True
    return path.startswith("/v1/runs/") and path.endswith("/config")


class _RefusedError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class RequestLimits:
    """The ASGI middleware (see the module docstring).

    Args:
        app: the application behind it.
        token: the service token.
        ingest_bytes: the cap on an ingest body (``max_body_bytes``).
        buffered_bytes: the most body bytes held for all requests at once.
        on_unauthorized: called for every request refused for its token (a counter).
        clock: monotonic seconds (for the auth-failure buckets).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str,
        ingest_bytes: int,
        buffered_bytes: int,
        on_unauthorized: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app, self.token, self.ingest_bytes = app, token, ingest_bytes
        self.buffered_bytes, self.on_unauthorized, self.clock = (
            buffered_bytes,
            on_unauthorized,
            clock,
        )
        self.buffered = 0  # body bytes held right now (one event loop: no lock needed)
        self._failures: dict[str, tuple[float, float]] = {}  # host -> (tokens, at)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_token(scope)
            limit = self._limit(scope)
            body = await self._read(scope, receive, limit)
        except _RefusedError as exc:
            await _answer(send, exc.status, str(exc), exc.headers)
            return
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.buffered -= len(body)

    def _check_token(self, scope: Scope) -> None:
        if not needs_token(scope["method"], scope["path"]):
            return
        problem = token_problem(_header(scope, b"authorization"), self.token)
        if problem is None:
            return
        self.on_unauthorized()
        host = (scope.get("client") or ("?", 0))[0]
        if not self._may_fail(host):
            raise _RefusedError(
                429,
                "too many requests with a missing or wrong token: wait, then send "
                "Authorization: Bearer <the service's token>",
                {"Retry-After": "1"},
            )
        status, message = problem
        challenge = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        raise _RefusedError(status, message, challenge)

    def _may_fail(self, host: str) -> bool:
        """A token bucket per client host for token-check failures."""
        now = self.clock()
        tokens, at = self._failures.get(host, (float(AUTH_FAILURE_BURST), now))
        tokens = min(float(AUTH_FAILURE_BURST), tokens + (now - at) * AUTH_FAILURES_PER_S)
        if len(self._failures) > 10_000:  # many hosts: forget them rather than grow
            self._failures.clear()
        self._failures[host] = (max(tokens - 1.0, 0.0), now)
        return tokens >= 1.0

    def _limit(self, scope: Scope) -> int:
        if scope["method"] == "POST" and scope["path"].endswith("/records"):
            return self.ingest_bytes
        return SMALL_BODY_BYTES

    async def _read(self, scope: Scope, receive: Receive, limit: int) -> bytes:
        """The whole body, refused past ``limit`` (declared or streamed) or past the
        memory all requests may hold at once."""
        declared = _header(scope, b"content-length")
        if declared is not None and not declared.isdigit():
            raise _RefusedError(400, f"Content-Length={declared!r} is invalid: send a byte count")
        if declared is not None and int(declared) > limit:
            raise _RefusedError(413, f"body is {declared} bytes: send at most {limit}")
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                self.buffered += len(chunk)
                if size > limit:
                    raise _RefusedError(413, f"body exceeds {limit} bytes: send smaller batches")
                if self.buffered > self.buffered_bytes:
                    raise _RefusedError(
                        503, "the service holds too many request bodies: retry shortly",
                        {"Retry-After": "1"},
                    )  # fmt: skip
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        except _RefusedError:
            self.buffered -= size
            raise
        return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the buffered body over once, then waits as the server's."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _answer(send: Send, status: int, message: str, headers: dict[str, str]) -> None:
    field = {"field": "body"} if status in (400, 413) else {}
    payload = json.dumps({"error": message, **field}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    # The body was not read: close the connection rather than leave it half-consumed.
    raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
