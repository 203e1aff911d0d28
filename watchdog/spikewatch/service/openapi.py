"""The OpenAPI document's parts that FastAPI cannot derive: the hand-checked ingest route."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from spikewatch.validation import RUN_ID_PATTERN

_RECORD_SCHEMA = {
    "type": "object",
    "required": ["step", "loss"],
    "properties": {
        "step": {"type": "integer"},
        "loss": {"type": "number", "description": "NaN and Infinity are valid (JSON literals)"},
        "grad_norm": {"type": ["number", "null"]},
        "lr": {"type": ["number", "null"]},
        "data_position": {"type": ["integer", "null"]},
        "wall_time": {"type": ["number", "null"]},
        "run": {"type": "string", "description": "optional; must equal the run in the URL"},
    },
    "additionalProperties": False,
}
INGEST_PATH = "/v1/runs/{run}/records"

_INGEST_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["records"],
                "properties": {
                    "records": {"type": "array", "items": _RECORD_SCHEMA},
                    "seq": {"type": ["integer", "null"]},
                    "client": {"type": ["string", "null"]},
                    "acks": {"type": "array", "items": {"type": "string"}},
                    "rewind_to": {"type": ["integer", "null"]},
                    "dropped": {"type": ["integer", "null"]},
                    "finished": {"type": "boolean"},
                    "decisions": {
                        "type": "array",
                        "items": {"type": "object"},
                        "description": "the trainer's own decisions (Decision JSON): the "
                        "trainer decides, the service stores and announces them",
                    },
                    "events": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["event"],
                            "properties": {
                                "event": {"enum": ["proposed", "folded", "refused", "expired"]}
                            },
                        },
                        "description": "what the trainer did about proposals and commands",
                    },
                    "config": {
                        "type": ["object", "null"],
                        "description": "the trainer's settings",
                    },
                    "restorable": {
                        "type": ["array", "null"],
                        "items": {"type": "integer"},
                        "description": "steps the trainer can restore now",
                    },
                },
                "additionalProperties": False,
            }
        }
    },
}


INGEST_OPERATION = {
    "summary": "Ingest a batch of step records; returns the commands pending for the run",
    "operationId": "ingest_records",
    "parameters": [
        {
            "name": "run",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": RUN_ID_PATTERN},
        }
    ],
    "requestBody": _INGEST_BODY,
    "security": [{"HTTPBearer": []}],
    "responses": {
        "200": {
            "description": "accepted; the commands pending for the run",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/IngestOut"}}},
        },
        "400": {"description": "the body is not JSON"},
        "401": {"description": "no bearer token"},
        "403": {"description": "wrong token"},
        "413": {"description": "the body is too large"},
        "422": {"description": "a field is invalid; the message names it"},
        "429": {"description": "too many requests with a missing or wrong token"},
        "503": {"description": "the event store is unavailable, or too many bodies held"},
    },
}


_MEANING = {
    400: "the body is not JSON",
    401: "no bearer token",
    403: "wrong token",
    404: "no such run or command",
    409: "the command is not in a state that allows this",
    413: "the body is over the route's size limit (checked before it is read)",
    422: "a field is invalid; the message names it",
    429: "too many requests with a missing or wrong token; retry after Retry-After",
    503: "the event store is unavailable, or too many bodies are held at once; retry",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error answers (all ``{"error", "field"}``)."""
    return {code: {"description": _MEANING[code]} for code in codes}


class IngestOut(BaseModel):
    """The answer to an ingest: the commands pending for the run."""

    accepted: int
    duplicate: bool
    commands: list[dict[str, Any]]
    skip_threshold: float | None
    halted: bool
    incidents: int
    vetoed: list[str]


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the ingest route (a plain Starlette route, see `create_app`)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["HTTPBearer"] = {
            "type": "http",
            "scheme": "bearer",
        }
        schema["components"].setdefault("schemas", {})["IngestOut"] = IngestOut.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        schema["paths"][INGEST_PATH] = {"post": INGEST_OPERATION}
        app.openapi_schema = schema
    return app.openapi_schema
