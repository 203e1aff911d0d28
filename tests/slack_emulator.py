"""A local stand-in for Slack's Web API and incoming webhooks, for the real slack_sdk clients.

It speaks enough of the protocol for ``WebClient(base_url=emulator.url + "/api/")`` and
``WebhookClient(emulator.url + "/services/T/B/X")``: ``chat.postMessage``, the three
steps of ``files_upload_v2`` (``files.getUploadURLExternal``, the upload POST,
``files.completeUploadExternal``) and webhook posts. Every request is recorded, and
faults (429 with Retry-After, 5xx, a server that hangs) can be injected.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

_CHANNEL_ID = re.compile(r"[CGD][A-Z0-9]{8,}")
_TS = re.compile(r"\d+\.\d+")


@dataclass
class Call:
    """One request the emulator received.

    ``method`` is the Web API method (``chat.postMessage``), ``upload`` for the file
    bytes POST, or ``webhook``; ``status`` is the HTTP status it was answered with
    (0 while it hangs, and for good when it was dropped unanswered: Slack never had it).
    """

    method: str
    payload: dict[str, Any]
    body: bytes
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Fault:
    remaining: int
    status: int
    retry_after: int | None
    method: str | None


def channel_id(channel: str) -> str:
    """The ID Slack would answer for a channel name (an ID maps to itself)."""
    if _CHANNEL_ID.fullmatch(channel):
        return channel
    return "C" + hashlib.sha1(channel.lstrip("#").encode()).hexdigest()[:10].upper()


class SlackEmulator:
    """An HTTP server on 127.0.0.1 (a free port) that answers like Slack.

    Args:
        token: the only bot token ``chat.postMessage`` and ``files.*`` accept.
    """

    def __init__(self, *, token: str = "xoxb-emulator-token") -> None:
        self.token = token
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._faults: list[_Fault] = []
        self._ts = 0
        self._files: dict[str, bytes | None] = {}
        self._hang_s: float | None = None
        self._drop_held = False
        self._release = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.emulator = self
        # A short poll keeps shutdown() (run after every test) from costing half a second.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> SlackEmulator:
        """Serve on a daemon thread; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release hanging requests, stop serving and close the socket."""
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def fail_next(
        self,
        n: int,
        *,
        status: int = 429,
        retry_after: int | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next ``n`` requests (to ``method`` only, if given) with ``status``."""
        with self._lock:
            self._faults.append(_Fault(n, status, retry_after, method))

    def hang(self, seconds: float | None, *, answer_held: bool = True) -> None:
        """Hold every request ``seconds`` before answering (None: answer at once).

        With ``answer_held=False``, the requests held until now are dropped: their
        connections close unanswered and nothing was posted (what a client killed
        during the hang, or a Slack that lost them, leaves behind).
        """
        with self._lock:
            self._hang_s = seconds
            if seconds is None:
                self._drop_held = not answer_held
        if seconds is None:
            self._release.set()
        else:
            self._release.clear()

    @property
    def calls(self) -> list[Call]:
        """A copy of every request received so far, in arrival order."""
        with self._lock:
            return list(self._calls)

    def calls_to(self, method: str, *, status: int | None = 200) -> list[Call]:
        """The requests to ``method`` (answered with ``status``; None: any status)."""
        return [c for c in self.calls if c.method == method and status in (None, c.status)]

    # -- used by the handler -------------------------------------------------------------

    def _record(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)

    def _take_fault(self, method: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.method in (None, method):
                    fault.remaining -= 1
                    return fault
            return None

    def _wait_if_hanging(self) -> bool:
        """Hold a request while hanging; False when it is to be dropped unanswered."""
        with self._lock:
            hang = self._hang_s
        if hang is None:
            return True
        self._release.wait(hang)
        with self._lock:
            return not self._drop_held

    def posted(self, text: str | None = None) -> list[Call]:
        """Messages Slack took (``chat.postMessage`` answered ok), or those containing ``text``."""
        return [
            c
            for c in self.calls_to("chat.postMessage")
            if text is None or text in str(c.payload.get("text", ""))
        ]

    def _next_ts(self) -> str:
        with self._lock:
            self._ts += 1
            return f"1700000000.{self._ts:06d}"

    def _api(self, method: str, params: dict[str, Any], auth: str | None) -> dict[str, Any]:
        if auth != f"Bearer {self.token}":
            return {"ok": False, "error": "invalid_auth" if auth else "not_authed"}
        if method == "chat.postMessage":
            return self._post_message(params)
        if method == "files.getUploadURLExternal":
            file_id = f"F{len(self._files) + 1:09d}"
            with self._lock:
                self._files[file_id] = None
            return {"ok": True, "upload_url": f"{self.url}/upload/{file_id}", "file_id": file_id}
        if method == "files.completeUploadExternal":
            return self._complete_upload(params)
        return {"ok": False, "error": "unknown_method"}

    def _post_message(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = params.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if not params.get("text") and not params.get("blocks"):
            return {"ok": False, "error": "no_text"}
        thread_ts = params.get("thread_ts")
        if thread_ts is not None and not _TS.fullmatch(str(thread_ts)):
            return {"ok": False, "error": "invalid_thread_ts"}
        ts = self._next_ts()
        message = {"type": "message", "text": params.get("text", ""), "ts": ts}
        return {"ok": True, "channel": channel_id(str(channel)), "ts": ts, "message": message}

    def _complete_upload(self, params: dict[str, Any]) -> dict[str, Any]:
        files = json.loads(str(params.get("files", "[]")))
        if not _CHANNEL_ID.fullmatch(str(params.get("channel_id", ""))):
            return {"ok": False, "error": "invalid_channel"}  # an ID, never a name, here
        with self._lock:
            missing = [f["id"] for f in files if self._files.get(f["id"]) is None]
        if missing or not files:
            return {"ok": False, "error": "file_not_found"}
        return {"ok": True, "files": [{"id": f["id"], "title": f.get("title")} for f in files]}


class _Server(ThreadingHTTPServer):
    emulator: SlackEmulator


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    _call: Call

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean."""

    @property
    def emulator(self) -> SlackEmulator:
        return self.server.emulator

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path)
        method = _method_of(path.path)
        content_type = "" if method == "upload" else self.headers.get("Content-Type", "")
        payload = _parse(body, content_type, path.query)
        call = Call(method=method, payload=payload, body=body, headers=dict(self.headers.items()))
        self.emulator._record(call)  # on arrival, so a test can see a request that hangs
        if not self.emulator._wait_if_hanging():
            self.close_connection = True  # dropped: no answer, nothing posted
            return
        self._call = call
        fault = self.emulator._take_fault(method)
        if fault is not None:
            self._fail(fault)
            return
        if method == "webhook":
            # Slack takes a webhook post with text, blocks or (legacy, Alertmanager's) attachments.
            ok = bool(payload.get("text") or payload.get("blocks") or payload.get("attachments"))
            self._reply(200 if ok else 400, b"ok" if ok else b"no_text", "text/html")
        elif method == "upload":
            self._upload(path.path.rsplit("/", 1)[-1], body)
        else:
            answer = self.emulator._api(method, payload, self.headers.get("Authorization"))
            self._reply(200, json.dumps(answer).encode(), "application/json")

    def _upload(self, file_id: str, body: bytes) -> None:
        with self.emulator._lock:
            known = file_id in self.emulator._files
            if known:
                self.emulator._files[file_id] = body
        self._reply(200 if known else 404, f"OK - {len(body)}".encode(), "text/plain")

    def _fail(self, fault: _Fault) -> None:
        headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        error = "ratelimited" if fault.status == 429 else "internal_error"
        body = json.dumps({"ok": False, "error": error}).encode()
        self._reply(fault.status, body, "application/json", headers)

    def _reply(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self._call.status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout under test): what a real server sees too


def _method_of(path: str) -> str:
    if path.startswith("/api/"):
        return path.removeprefix("/api/")
    if path.startswith("/upload/"):
        return "upload"
    if path.startswith("/services/"):
        return "webhook"
    return path


def _parse(body: bytes, content_type: str, query: str) -> dict[str, Any]:
    """Query string plus a JSON or form-encoded body."""
    payload: dict[str, Any] = dict(parse_qsl(query))
    if content_type.startswith("application/json"):
        payload.update(json.loads(body or b"{}"))
    elif content_type.startswith("application/x-www-form-urlencoded"):
        payload.update(parse_qsl(body.decode(), keep_blank_values=True))
    return payload


@contextmanager
def running_emulator(*, token: str = "xoxb-emulator-token") -> Iterator[SlackEmulator]:
    """Start an emulator for the ``with`` block, then stop it."""
    emulator = SlackEmulator(token=token).start()
    try:
        yield emulator
    finally:
        emulator.stop()
