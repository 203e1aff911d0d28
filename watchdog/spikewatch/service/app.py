"""The HTTP API of `spikewatch serve` (FastAPI): ingest, commands, views, /metrics, /healthz.

The ingest route reads and validates its body itself (`payloads`), not through a
pydantic model: at hundreds of records per request a schema library costs more than
the detectors. Its schema is still published in the OpenAPI document.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Path as FastApiPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from spikewatch import __version__
from spikewatch.service.core import Service
from spikewatch.service.incidents_command import with_commands
from spikewatch.service.limits import RequestLimits, token_problem
from spikewatch.service.openapi import INGEST_PATH, build_openapi, errors
from spikewatch.service.operator import OperatorError
from spikewatch.service.payloads import PayloadError, check_run_id, parse_ingest, parse_json
from spikewatch.validation import RUN_ID_PATTERN

log = logging.getLogger(__name__)

RunId = Annotated[str, FastApiPath(pattern=RUN_ID_PATTERN, description="the run id")]


#: The most batches a rollback may skip ahead (a billion: beyond any real data set).
MAX_SKIP_AHEAD = 10**9


class CommandIn(BaseModel):
    """An operator's command for a run."""

    model_config = ConfigDict(extra="forbid")  # a typo like "reson" is an error, not ignored

    action: Literal["halt", "resume", "approve", "veto", "rollback"]
    command: str | None = Field(
        default=None, max_length=64, description="the proposed command (approve, veto)"
    )
    reason: str = Field(default="operator request", max_length=500)
    rollback_before_step: int | None = Field(
        default=None, ge=0, le=2**53, description="rollback: restore at or before this step"
    )
    skip_ahead: int = Field(
        default=0, ge=0, le=MAX_SKIP_AHEAD, description="rollback: batches to skip past"
    )


def _json(data: Any, status: int = 200) -> Response:
    # NaN/inf stay JSON literals, as on the way in (a non-finite loss is data).
    return Response(json.dumps(data), status_code=status, media_type="application/json")


_BEARER = HTTPBearer(auto_error=False, description="the service token (SPIKEWATCH_TOKEN)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]


def _authoriser(service: Service) -> Callable[[Credentials], Awaitable[None]]:
    """The dependency of the FastAPI write routes: declares the bearer scheme in OpenAPI.

    `RequestLimits` has checked the token before the body was read; this checks again
    for an app mounted without it.
    """

    async def authorised(credentials: Credentials) -> None:
        header = None if credentials is None else f"Bearer {credentials.credentials}"
        problem = token_problem(header, service.token)
        if problem is not None:
            service.ingest_counts["unauthorized"] += 1
            headers = {"WWW-Authenticate": "Bearer"} if problem[0] == 401 else None
            raise HTTPException(problem[0], problem[1], headers)

    return authorised


#: Bodies above this are parsed and ingested on a worker thread, so one big batch does
#: not hold up every other request (smaller ones stay on the loop: a thread hop costs
#: more than they do).
THREAD_BODY_BYTES = 64 * 1024


def _install_error_handlers(app: FastAPI, service: Service) -> None:
    """Every error answers ``{"error": message[, "field": path]}`` with a 4xx (or 503)."""

    @app.exception_handler(PayloadError)
    async def payload_error(request: Request, exc: PayloadError) -> Response:
        if request.url.path.endswith("/records"):  # the metric counts ingest requests
            service.ingest_counts["rejected"] += 1
        return JSONResponse({"error": str(exc), "field": exc.field}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # One error shape everywhere: {"error": message[, "field": path]}.
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid"}
        loc = [str(p) for p in first["loc"]]
        field = ".".join(loc[1:] if loc[0] in ("body", "path", "query") else loc) or "body"
        if first.get("type") == "json_invalid":
            return JSONResponse(
                {"error": f"body is not valid JSON: {first['msg']}", "field": "body"}, 400
            )
        shown = repr(first["input"])[:80] if "input" in first else "?"
        message = f"{field}={shown} is invalid: {first['msg']}"
        return JSONResponse({"error": message, "field": field}, status_code=422)

    @app.exception_handler(OperatorError)
    async def operator_error(request: Request, exc: OperatorError) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(sqlite3.Error)
    async def store_error(request: Request, exc: sqlite3.Error) -> Response:
        log.error("spikewatch: event store failed: %s", exc)
        return JSONResponse(
            {"error": f"event store unavailable ({exc}): retry later"}, status_code=503
        )


def create_app(service: Service) -> FastAPI:
    """Build the ASGI app around a `Service` (which owns state, store, jobs and sinks)."""
    # /docs and /redoc from the package's own Swagger UI and ReDoc files, not a CDN: a
    # training cluster is often offline, and a CDN page there is blank.
    app = FastAPIOffline(
        title="spikewatch", version=__version__, description="Loss-spike watchdog service."
    )

    _install_error_handlers(app, service)
    authorised = _authoriser(service)
    app.add_middleware(
        RequestLimits,
        token=service.token,
        ingest_bytes=service.config.max_body_bytes,
        buffered_bytes=4 * service.config.max_body_bytes,
        on_unauthorized=lambda: service.ingest_counts.update(("unauthorized",)),
    )

    # Ingest is the hot path: a plain Starlette route, without FastAPI's per-request
    # dependency solving and validation machinery (it checks its own body). Its schema
    # is added to the OpenAPI document by `build_openapi`. The token and the body size
    # were checked by `RequestLimits` before the body was read.
    def work(run: str, body: bytes) -> dict[str, Any]:
        batch = parse_ingest(parse_json(body), run, max_records=service.config.max_records)
        return service.registry.ingest(run, batch, body)

    async def ingest(request: Request) -> Response:
        run = check_run_id(request.path_params["run"])
        body = await request.body()
        if len(body) > THREAD_BODY_BYTES:
            response = await run_in_threadpool(work, run, body)
        else:
            response = work(run, body)
        service.ingest_counts["accepted"] += 1
        return _json(response)

    app.router.routes.append(Route(INGEST_PATH, ingest, methods=["POST"]))
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]

    @app.get("/v1/runs", summary="Every run's status")
    def runs() -> Response:
        return _json({"runs": [service.run_view(s) for s in service.registry.statuses()]})

    @app.get("/v1/runs/{run}", summary="One run's status and commands", responses=errors(404, 422))
    def run_detail(run: RunId) -> Response:
        status = service.registry.status(check_run_id(run))
        if status is None:
            raise HTTPException(404, f"no run {run!r}: it has sent no records yet")
        return _json({**service.run_view(status), "commands": service.store.commands(run)})

    @app.get(
        "/v1/runs/{run}/config",
        dependencies=[Depends(authorised)],
        summary="The settings a trainer starting this run should use",
        responses=errors(401, 403, 422, 429),
    )
    def run_config(run: RunId) -> Response:
        return _json(service.run_settings(check_run_id(run)))

    @app.get(
        "/v1/runs/{run}/incidents",
        summary="A run's incidents, oldest first",
        responses=errors(404, 422),
    )
    def incidents(run: RunId) -> Response:
        if service.registry.status(check_run_id(run)) is None:
            raise HTTPException(404, f"no run {run!r}: it has sent no records yet")
        incidents = with_commands(service.store.incidents(run), service.store.commands(run))
        return _json({"incidents": incidents})

    @app.post(
        "/v1/runs/{run}/commands",
        dependencies=[Depends(authorised)],
        summary="An operator's command: halt, resume, rollback, approve or veto a rollback",
        responses=errors(400, 401, 403, 404, 409, 413, 422, 429, 503),
    )
    def command(run: RunId, body: CommandIn) -> Response:
        result = service.operator.apply(check_run_id(run), **body.model_dump())
        return _json(result)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {}}, "description": "text exposition"}},
    )
    def metrics() -> Response:
        payload, content_type = service.render_metrics()
        return Response(payload, media_type=content_type)

    @app.get("/healthz", summary="Liveness, store and scheduled jobs", responses=errors(503))
    def healthz() -> Response:
        health = service.health()
        return _json(health, 503 if health["status"] == "down" else 200)

    return app
